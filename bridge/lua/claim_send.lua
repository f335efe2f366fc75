-- claim_send: claim a delivery's marker just before a send and charge the sink's rates.
-- KEYS[1] the delivery's marker, KEYS[2..] rate keys (the sink's, then per-recipient ones)
-- ARGV[1] owner, ARGV[2] owner's instance prefix ("<instance>:"), ARGV[3] marker ttl ms,
-- ARGV[4] '1' to charge the rates ('0': only keep the claim alive), ARGV[5..] (interval ms, burst)
--   per rate key
-- Returns {status, value}: {'ok', '0'} the marker is ours (and every rate charged);
--   {'done', 'done:<remote id>'} already sent; {'busy', '<marker ttl ms>'} another live instance
--   holds it; {'wait', '<ms>'} ours, but a rate says wait that long (nothing charged).
--!include claim.lua
--!include gcra.lua
local st = claim(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
if st == 'busy' then return {'busy', tostring(redis.call('PTTL', KEYS[1]))} end
if st ~= 'ok' then return {'done', st} end
if ARGV[4] ~= '1' then return {'ok', '0'} end
local wait = gcra(2, 5)
if wait > 0 then return {'wait', tostring(wait)} end
return {'ok', '0'}

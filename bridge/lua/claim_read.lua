-- claim_read: run in a read's pipeline just after its XREADGROUP; claims the markers of the entries
-- that read gave this consumer (its pending entries newer than the last id read before).
-- KEYS[1] the sink's stream
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] the id read last before ('0-0' for none), ARGV[4] how
-- many at most, ARGV[5] owner, ARGV[6] owner's instance prefix, ARGV[7] claim ttl ms, ARGV[8] the
-- markers' key prefix (under the sink's hash tag: the same slot as KEYS[1])
-- Entry field 'i' holds the delivery id (bridge.bus.Field.DELIVERY_ID).
-- Returns flat (entry id, status) pairs: status as claim.lua's, or '' for an entry without a
-- delivery id (written by an older version: its worker claims it alone) or trimmed away.
--!include claim.lua
local out = {}
for _, p in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], '(' .. ARGV[3], '+', ARGV[4], ARGV[2])) do
  local id, st = p[1], ''
  local e = redis.call('XRANGE', KEYS[1], id, id)[1]
  if e then
    local f = e[2]
    for i = 1, #f, 2 do
      if f[i] == 'i' then st = claim(ARGV[8] .. f[i + 1], ARGV[5], ARGV[6], ARGV[7]) end
    end
  end
  out[#out + 1] = id
  out[#out + 1] = st
end
return out

-- sync: a runner's bookkeeping in one call: set done markers, ack entries, claim markers.
-- KEYS[1] the sink's stream, KEYS[2 .. 1+nd] markers to set done, KEYS[2+nd ..] markers to claim
-- ARGV[1] group, ARGV[2] done ttl s, ARGV[3] nd, ARGV[4] na (entry ids to ack), ARGV[5] owner,
-- ARGV[6] owner's instance prefix, ARGV[7] claim ttl ms, then nd done values ('done:<remote id>'),
-- then na entry ids (acked in chunks of 500)
-- Returns, per marker to claim, in order: 'ok', 'busy' or 'done:<remote id>' (see claim.lua).
--!include claim.lua
local nd, na = tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 1, nd do
  redis.call('SET', KEYS[1 + i], ARGV[7 + i], 'EX', ARGV[2])
end
local a = 8 + nd
local i = 0
while i < na do
  local j = math.min(i + 500, na)
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, a + i, a + j - 1))
  i = j
end
local out = {}
for k = 2 + nd, #KEYS do
  out[#out + 1] = claim(KEYS[k], ARGV[5], ARGV[6], ARGV[7])
end
return out

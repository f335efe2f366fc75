-- publish_many: store envelopes on the inbound stream, in order, each deduped by its marker.
-- KEYS[1] the inbound stream, KEYS[1+k] envelope k's dedupe marker (value: the stream id)
-- ARGV[1] maxlen (approximate trim), ARGV[2k] envelope k, ARGV[2k+1] its dedupe ttl in seconds
--   ('0': no dedupe, the marker is not read or written)
-- Each stored entry has one field, 'e' (bridge.bus.Field.ENVELOPE).
-- Returns one flag per envelope, in order: 1 stored, 0 a duplicate (marker present; not stored).
local out = {}
for i = 1, #KEYS - 1 do
  local ttl = ARGV[2 * i + 1]
  if ttl ~= '0' and redis.call('EXISTS', KEYS[1 + i]) == 1 then
    out[i] = 0
  else
    local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[2 * i])
    if ttl ~= '0' then redis.call('SET', KEYS[1 + i], id, 'EX', ttl) end
    out[i] = 1
  end
end
return out

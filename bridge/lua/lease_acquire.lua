-- lease_acquire: take a named lease, or keep it when we already hold it.
-- KEYS[1] the lease (string "<owner>|<fence>"), KEYS[2] its fence counter (never expires)
-- ARGV[1] owner (unique per process life), ARGV[2] ttl in ms
-- Returns {fence, 0} when the lease is ours (a new fence when it was free, the same one when we
--   held it: its ttl is renewed), or {0, ms left} while another owner holds it.
local v = redis.call('GET', KEYS[1])
if v then
  local sep = string.find(v, '|', 1, true)
  if sep and string.sub(v, 1, sep - 1) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {tonumber(string.sub(v, sep + 1)), 0}
  end
  return {0, redis.call('PTTL', KEYS[1])}
end
local fence = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. fence, 'PX', ARGV[2])
return {fence, 0}

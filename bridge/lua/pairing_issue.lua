-- pairing_issue: the pairing code of one unknown sender on one inbound (the same one until it
-- expires), or why there is none. Expired codes are dropped from the pending hash on the way.
-- KEYS[1] pending hash of the inbound: sender -> "<code>|<expires ms>"
-- KEYS[2] the key of the candidate code (set to ARGV[5] with the TTL when the candidate is used)
-- KEYS[3] the inbound's set of paired senders
-- ARGV[1] sender id
-- ARGV[2] candidate code (fresh, random)
-- ARGV[3] TTL of a code in ms
-- ARGV[4] most codes pending at once on this inbound
-- ARGV[5] the code key's value: "<inbound>\31<sender>"
-- Returns {status, code, expires ms}: status 'existing' (the sender's code still valid), 'new' (the
-- candidate is now its code), 'paired' (already approved), 'full' (too many pending), 'taken' (the
-- candidate is in use: draw another).
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then return {'paired', '', '0'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mine = redis.call('HGET', KEYS[1], ARGV[1])
if mine then
  local sep = string.find(mine, '|', 1, true)
  local expires = tonumber(string.sub(mine, sep + 1))
  if expires > now then return {'existing', string.sub(mine, 1, sep - 1), tostring(expires)} end
  redis.call('HDEL', KEYS[1], ARGV[1])
end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    local v = all[i + 1]
    local sep = string.find(v, '|', 1, true)
    if tonumber(string.sub(v, sep + 1)) <= now then redis.call('HDEL', KEYS[1], all[i]) end
  end
  if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return {'full', '', '0'} end
end
if redis.call('SET', KEYS[2], ARGV[5], 'NX', 'PX', ARGV[3]) == false then return {'taken', '', '0'} end
local expires = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. tostring(expires))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'new', ARGV[2], tostring(expires)}

-- token_drop: forget the cached token WeChat rejected, unless another process already stored a new one.
-- KEYS[1] the token ("<refresh-at> <token>")
-- ARGV[1] the rejected token
-- Returns 1 deleted, 0 the cached token is another one (or none).
local v = redis.call('GET', KEYS[1])
if v then
  local sp = string.find(v, ' ', 1, true)
  if sp and string.sub(v, sp + 1) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
end
return 0

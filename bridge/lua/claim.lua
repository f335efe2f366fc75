-- fragment claim: take a delivery's idempotency marker for an owner, unless it was sent or another
-- live instance holds it. Defines one local function; sets no variables.
--   claim(marker, owner, prefix, ttl_ms) -> 'ok'               the marker is now ours for ttl_ms
--                                        -> 'busy'             another live instance holds it
--                                        -> 'done:<remote id>' it was sent (the marker's value)
-- owner is "<instance>:<process life>"; prefix is "<instance>:": a marker another life of our own
-- instance left is ours to take over (that life is gone: one instance name runs one process).
local function claim(marker, owner, prefix, ttl_ms)
  local v = redis.call('GET', marker)
  if v and string.sub(v, 1, 5) == 'done:' then return v end
  if v and v ~= owner and string.sub(v, 1, #prefix) ~= prefix then return 'busy' end
  redis.call('SET', marker, owner, 'PX', ttl_ms)
  return 'ok'
end

-- drop_consumers: forget a group's consumers that hold nothing and were idle long enough (names of
-- instances that are gone: a container restarted under a new name leaves its old one behind).
-- KEYS[1] the stream
-- ARGV[1] group, ARGV[2] our consumer name (kept), ARGV[3] idle ms a consumer must have been idle
-- A consumer with pending entries is never dropped (XGROUP DELCONSUMER would drop them with it).
-- Returns the names dropped.
local dropped = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['name'] ~= ARGV[2] and tonumber(f['pending']) == 0 and tonumber(f['idle']) >= tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    dropped[#dropped + 1] = f['name']
  end
end
return dropped

-- held_request: a non-holder asks the holder of a held connection to run a request.
-- KEYS[1] the request list, KEYS[2] the request's result record (done:<request id>)
-- ARGV[1] the request entry (JSON: id, op, payload, ans, deadline), ARGV[2] the list's ttl in ms
-- Returns the recorded result when this request id already ran (nothing is queued then), else
--   false after the entry was appended to the request list (the holder pops from the head).
local done = redis.call('GET', KEYS[2])
if done then return done end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return false

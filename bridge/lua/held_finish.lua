-- held_finish: the holder records a request's result, then answers the requester.
-- KEYS[1] the result record (done:<request id>), KEYS[2] the answer list (ans:<request id>)
-- ARGV[1] the answer (JSON), ARGV[2] the record's ttl in ms ('0': do not record: a retryable
--   failure, which a retry must run again), ARGV[3] the answer list's ttl in ms
-- The record is written first (when kept it is never replaced: the first result of a request id
--   stays its result), then the answer pushed. Returns the answer sent (the recorded one if any).
local answer = ARGV[1]
if ARGV[2] ~= '0' then
  local ok = redis.call('SET', KEYS[1], answer, 'PX', ARGV[2], 'NX')
  if not ok then answer = redis.call('GET', KEYS[1]) end
end
redis.call('DEL', KEYS[2])
redis.call('RPUSH', KEYS[2], answer)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return answer

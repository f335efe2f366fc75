-- token_store: cache a freshly fetched access token and release the fetch lock, if we still hold it.
-- KEYS[1] the token, KEYS[2] the fetch lock
-- ARGV[1] the value ("<refresh-at> <token>"), ARGV[2] its ttl in ms, ARGV[3] the lock's owner
-- Returns 1. (A lock taken over by another fetcher meanwhile is left to that fetcher.)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1

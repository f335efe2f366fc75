-- lock_release: delete the fetch lock only if it is still ours (a lock that expired and was taken by
-- another fetcher is not ours to free).
-- KEYS[1] the lock
-- ARGV[1] our owner token
-- Returns 1 deleted, 0 not ours (or gone).
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0

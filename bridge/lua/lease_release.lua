-- lease_release: give a lease up, only if it is still ours (an old holder never frees a new one's).
-- KEYS[1] the lease
-- ARGV[1] owner, ARGV[2] fence
-- Returns 1 released, 0 it was not ours any more.
--!include lease_check.lua
if not lease_held(KEYS[1], ARGV[1], ARGV[2]) then return 0 end
redis.call('DEL', KEYS[1])
return 1

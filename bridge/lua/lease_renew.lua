-- lease_renew: extend a lease we hold; refuse when it expired or another owner took it since.
-- KEYS[1] the lease
-- ARGV[1] owner, ARGV[2] fence we were given, ARGV[3] ttl in ms
-- Returns 1 renewed, 0 lost (the lease is someone else's or nobody's: stop acting under it).
--!include lease_check.lua
if not lease_held(KEYS[1], ARGV[1], ARGV[2]) then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1

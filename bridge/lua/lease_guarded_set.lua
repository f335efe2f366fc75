-- lease_guarded_set: SET a key only while holding a lease (e.g. a poller's cursor checkpoint).
-- KEYS[1] the lease, KEYS[2] the key to set
-- ARGV[1] owner, ARGV[2] fence, ARGV[3] value, ARGV[4] ttl in seconds ('0': no expiry)
-- Returns 1 written, 0 refused (the lease is not ours: nothing written).
--!include lease_check.lua
if not lease_held(KEYS[1], ARGV[1], ARGV[2]) then return 0 end
if ARGV[4] ~= '0' then
  redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
else
  redis.call('SET', KEYS[2], ARGV[3])
end
return 1

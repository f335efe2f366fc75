-- fragment lease_check: lease_held(key, owner, fence) is true when the lease ``key`` is held by
-- ``owner`` under ``fence``. Scripts that write under a lease include it and refuse the write when
-- it is false: a paused old holder cannot act after its lease moved on.
local function lease_held(key, owner, fence)
  return redis.call('GET', key) == owner .. '|' .. fence
end

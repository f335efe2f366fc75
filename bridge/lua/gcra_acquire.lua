-- gcra_acquire: take one token from every rate key at once, or learn how long to wait.
-- KEYS[1..n] rate keys (GCRA state, TTL'd)
-- ARGV[2k-1], ARGV[2k] interval in ms and burst for KEYS[k]
-- Returns the wait in ms as a string: '0' when allowed (every key charged), else how long until
-- all would allow (no key charged).
--!include gcra.lua
local wait = gcra(1, 1)
if wait > 0 then return tostring(wait) end
return '0'

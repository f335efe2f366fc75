-- fragment gcra: the generic cell rate algorithm over several keys at once, on Redis' clock.
-- Defines one local function; sets no variables.
--   gcra(first_key, first_arg) -> wait in ms (a number; 0 = allowed)
-- Reads KEYS[first_key ..] (each the "theoretical arrival time", TAT, in ms) with, per key, two
-- ARGV from ARGV[first_arg] on: interval in ms, burst. A key is allowed when
-- max(TAT, now) + interval - now <= burst * interval; all keys are charged (TAT += interval, with a
-- TTL until it is past) only when all allow, else none is and the longest wait is returned.
local function gcra(first_key, first_arg)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  local wait = 0
  local tats = {}
  for i = first_key, #KEYS do
    local j = first_arg + (i - first_key) * 2
    local interval = tonumber(ARGV[j])
    local burst = tonumber(ARGV[j + 1])
    local tat = tonumber(redis.call('GET', KEYS[i]) or now)
    if tat < now then tat = now end
    local new_tat = tat + interval
    local over = new_tat - now - burst * interval
    if over > wait then wait = over end
    tats[i] = new_tat
  end
  if wait <= 0 then
    for i = first_key, #KEYS do
      redis.call('SET', KEYS[i], string.format('%.3f', tats[i]), 'PX', math.ceil(tats[i] - now) + 1)
    end
  end
  return wait
end

-- replay: put dead letters back on one sink's stream, through the same idempotency marker.
-- KEYS[1] the sink's stream, KEYS[2..] the deliveries' idempotency markers (same slot: {out:<sink>})
-- ARGV[1] maxlen (approximate trim), ARGV[2..] (delivery id, delivery) pairs, in KEYS order
-- A marker that says 'done:dead' (given up) is cleared and the delivery appended, in order; a
-- marker that says the delivery was sent ('done:<remote id>') leaves it alone (never sent twice);
-- a marker still held by a runner (its dead letter was just written, the 'done:dead' not yet)
-- leaves it alone for now; no marker (expired) appends it, and the runner's claim decides.
-- Returns per delivery 1 (appended), 0 (already sent: skipped) or 2 (still held: try later).
local out = {}
for n = 2, #KEYS do
  local i = 2 * (n - 1)
  local mark = redis.call('GET', KEYS[n])
  if mark and string.sub(mark, 1, 5) == 'done:' and mark ~= 'done:dead' then
    out[n - 1] = 0
  elseif mark and string.sub(mark, 1, 5) ~= 'done:' then
    out[n - 1] = 2
  else
    if mark == 'done:dead' then
      redis.call('DEL', KEYS[n])
    end
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'd', ARGV[i + 1], 'i', ARGV[i])
    out[n - 1] = 1
  end
end
return out

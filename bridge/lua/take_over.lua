-- take_over: a new lease holder makes a stream's pending entries its own, a page at a time.
-- KEYS[1] the stream (a sink's partition, or the inbound stream)
-- ARGV[1] group, ARGV[2] our consumer name, ARGV[3] max deliveries, ARGV[4] page size,
-- ARGV[5] the cursor: the last pending id seen ('-' to start)
-- Each pending entry handed out ARGV[3] times or more (a poison entry crashing its readers) is not
-- claimed but returned, for the caller to copy to the dead letters and then ack; every other entry
-- pending on another consumer is claimed for us (XCLAIM JUSTID: its delivery count is unchanged;
-- our next read of our pending entries counts one). The holder of the lease is the only reader, so
-- no live consumer loses an entry it is sending.
-- Returns {next cursor ('' when done), how many claimed, then (id, times delivered) of each entry
-- to dead-letter}.
local start = ARGV[5] == '-' and '-' or '(' .. ARGV[5]
local page = redis.call('XPENDING', KEYS[1], ARGV[1], start, '+', tonumber(ARGV[4]))
local out = {'', 0}
local claim = {}
for _, p in ipairs(page) do
  local id, consumer, delivered = p[1], p[2], tonumber(p[4])
  if delivered >= tonumber(ARGV[3]) then
    out[#out + 1] = id
    out[#out + 1] = delivered
  elseif consumer ~= ARGV[2] then
    claim[#claim + 1] = id
  end
end
out[2] = #claim
if #claim > 0 then
  claim[#claim + 1] = 'JUSTID'
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(claim))
end
if #page == tonumber(ARGV[4]) then out[1] = page[#page][1] end
return out

-- add_deliveries: append deliveries to one sink's stream, in order.
-- KEYS[1] the sink's stream
-- ARGV[1] maxlen (approximate trim), ARGV[2..] (delivery id, delivery) pairs
-- Each entry: 'd' the delivery, 'i' its id (bridge.bus.Field.DELIVERY, DELIVERY_ID); the runner's
-- claim_read finds the delivery's marker by 'i'.
-- Returns how many entries were added.
for i = 2, #ARGV, 2 do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'd', ARGV[i + 1], 'i', ARGV[i])
end
return (#ARGV - 1) / 2

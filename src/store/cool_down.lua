-- pacegate: pause an upstream (or one partition) for every replica.
--
-- KEYS[1]  string: end of the shared cooldown (µs, Redis server clock)
-- KEYS[2]  when given: deleted (opening a circuit break: the probes of the
--          half-open state after it are counted anew)
-- ARGV[1]  pause (µs) from now
--
-- Only ever extends a cooldown; the key expires when the pause is over.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local pause = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if now + pause > current then
  redis.call('SET', KEYS[1], now + pause, 'PX', math.ceil(pause / 1000) + 1000)
end
if #KEYS > 1 then
  redis.call('DEL', KEYS[2])
end
return 1

-- pacegate: may one attempt leave now? GCRA on the Redis server's own clock,
-- so every replica shares one schedule whatever their clocks say.
--
-- KEYS[1]  hash: field i = theoretical arrival time (µs) of quota i
-- KEYS[2]  string: end of the shared cooldown (µs)
-- ARGV[1]  slack (µs): an attempt this late for its slot keeps the schedule
--          (the caller's margins make this safe, as in the local pacer)
-- ARGV[2i], ARGV[2i+1]  emission interval and burst tolerance (µs) of quota i
--
-- Returns {1, 0}: go, one slot of every quota taken; {0, µs}: the quotas
-- admit nobody before then; {2, µs}: the upstream cools down until then.
-- A refused call changes nothing: all quotas are consumed, or none.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local cooldown = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if cooldown > now then
  return {2, cooldown - now}
end
local slack = tonumber(ARGV[1])
local count = (#ARGV - 1) / 2
local fields = {}
for i = 1, count do
  fields[i] = tostring(i)
end
local tats = redis.call('HMGET', KEYS[1], unpack(fields))
local wait, keep, update = 0, 0, {}
for i = 1, count do
  local interval = tonumber(ARGV[2 * i])
  local tolerance = tonumber(ARGV[2 * i + 1])
  local tat = math.max(tonumber(tats[i]) or 0, now - slack)
  if tat - tolerance > now then
    wait = math.max(wait, tat - tolerance - now)
  end
  update[2 * i - 1] = fields[i]
  update[2 * i] = tat + interval
  keep = math.max(keep, tat + interval - now)
end
if wait > 0 then
  return {0, wait}
end
redis.call('HSET', KEYS[1], unpack(update))
-- Idle state expires once every quota would admit a full burst anyway.
redis.call('PEXPIRE', KEYS[1], math.ceil(keep / 1000) + 1000)
return {1, 0}

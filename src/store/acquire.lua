-- pacegate: how many of the next attempts may leave now? GCRA on the Redis
-- server's own clock, so every replica shares one schedule whatever their
-- clocks say.
--
-- KEYS[1]  hash: field i = theoretical arrival time (µs) of quota i
-- KEYS[2]  string: end of the shared cooldown (µs)
-- ARGV[1]  attempts waiting: at most this many slots are taken
-- ARGV[2]  slack (µs): an attempt this late for its slot keeps the schedule
--          (the caller's margins make this safe, as in the local pacer)
-- ARGV[2i+1], ARGV[2i+2]  emission interval and burst tolerance (µs) of quota i
--
-- Returns {1, n}: n >= 1 attempts go, a slot of every quota taken for each;
-- {0, µs}: the quotas admit nobody before then; {2, µs}: the upstream cools
-- down until then. Each slot is taken from all quotas or from none.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local cooldown = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if cooldown > now then
  return {2, cooldown - now}
end
local wanted = tonumber(ARGV[1])
local slack = tonumber(ARGV[2])
local count = (#ARGV - 2) / 2
local fields, tats = {}, {}
for i = 1, count do
  fields[i] = tostring(i)
end
local stored = redis.call('HMGET', KEYS[1], unpack(fields))
for i = 1, count do
  tats[i] = math.max(tonumber(stored[i]) or 0, now - slack)
end
local granted, wait = 0, 0
while granted < wanted and wait == 0 do
  for i = 1, count do
    local tolerance = tonumber(ARGV[2 * i + 2])
    if tats[i] - tolerance > now then
      wait = math.max(wait, tats[i] - tolerance - now)
    end
  end
  if wait == 0 then
    granted = granted + 1
    for i = 1, count do
      tats[i] = tats[i] + tonumber(ARGV[2 * i + 1])
    end
  end
end
if granted == 0 then
  return {0, wait}
end
local update, keep = {}, 0
for i = 1, count do
  update[2 * i - 1] = fields[i]
  update[2 * i] = tats[i]
  keep = math.max(keep, tats[i] - now)
end
redis.call('HSET', KEYS[1], unpack(update))
-- Idle state expires once every quota would admit a full burst anyway.
redis.call('PEXPIRE', KEYS[1], math.ceil(keep / 1000) + 1000)
return {1, granted}

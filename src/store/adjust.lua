-- pacegate: correct what earlier attempts took from one quota set, once
-- their answers said what they used (settling an LLM call's tokens). The
-- local pacer's `Pacer::adjust` rule for a schedule, on the Redis server's
-- clock, without its credit: what cannot go back before now is lost.
--
-- KEYS[1]  hash: one field per quota = its theoretical arrival time (µs)
-- ARGV[1]  units: positive takes more, negative gives back
-- ARGV[2]  number of quotas; then per quota: hash field, emission interval (µs)
--
-- Taking more pushes a quota's schedule on by that many intervals. Giving
-- back moves it back as far, but never before now: units returned do not
-- become a burst the quota does not allow; a schedule already behind now
-- owes nothing and is left alone. A quota without state (idle, expired)
-- has nothing to correct.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local units = tonumber(ARGV[1])
local count = tonumber(ARGV[2])

local keep = 0
for q = 1, count do
  local field, interval = ARGV[1 + 2 * q], tonumber(ARGV[2 + 2 * q])
  local tat = tonumber(redis.call('HGET', KEYS[1], field) or '')
  if tat and (units > 0 or tat > now) then
    tat = math.max(tat + interval * units, math.min(tat, now))
    redis.call('HSET', KEYS[1], field, tat)
    keep = math.max(keep, tat - now)
  end
end
-- Idle state expires as in acquire.lua; taking more may keep it longer.
if keep > 0 and redis.call('PTTL', KEYS[1]) < math.ceil(keep / 1000) + 1000 then
  redis.call('PEXPIRE', KEYS[1], math.ceil(keep / 1000) + 1000)
end
return 1

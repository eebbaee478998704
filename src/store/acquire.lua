-- pacegate: how many of the next attempts may leave now? GCRA on the Redis
-- server's own clock, so every replica shares one schedule whatever their
-- clocks say.
--
-- An attempt takes from one or more quota sets: its partition's own quotas
-- and each endpoint limit it matches, `cost` units of each quota of a set.
--
-- KEYS[1]    hash: one field per quota = its theoretical arrival time (µs),
--            and beside it `FIELD:interval`, the emission interval (µs) that
--            time was counted in, and `FIELD:granted`, the server time (µs)
--            of the last grant that took from the quota
-- KEYS[1+j]  string: end of quota set j's shared cooldown (µs)
-- ARGV[1]    attempts waiting: at most this many are granted
-- ARGV[2]    slack (µs): an attempt this late for its slot keeps the schedule
--            (the caller's margins make this safe, as in the local pacer)
-- ARGV[3]    number of quota sets; then per set: its cost in units, its
--            number of quotas, then per quota: hash field, emission interval
--            and burst tolerance (µs)
--
-- A cost is paid after the fact (even spacing by cost): an attempt leaves
-- when every quota admits one unit, then each quota's schedule moves on by
-- cost intervals. Each attempt takes from all quotas or from none.
--
-- A quota whose interval changed (a reload changed the rate) keeps its
-- schedule as the local pacer's `Pacer::requota` does: what the last grant
-- still owes is paid at the new interval, counted from that grant. Lowering
-- 10/s to 2/s puts the next slot 500 ms after the last grant, not 100 ms;
-- raising it never frees a burst.
--
-- KEYS[2+sets], when given: end of the upstream's shared circuit break (µs).
-- KEYS[3+sets], when given: probes taken by the replicas since a break
--            ended, with ARGV after the sets: probes allowed, probe window
--            (µs). The attempt is then a half-open breaker's probe: it goes
--            only while the replicas together took fewer than allowed in
--            the window; otherwise {4, µs, 0}: ask again within a second (a
--            probe that succeeds clears the count), or when the window ends.
--
-- Returns {1, n, 0}: n >= 1 attempts go; {0, µs, j}: the quotas admit nobody
-- before then, set j being the one that waits longest; {2, µs, j}: set j
-- cools down until then; {3, µs, 0}: the upstream's breaker is open until then;
-- {4, µs, 0}: the replicas' probes are out, ask again then.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local wanted = tonumber(ARGV[1])
local slack = tonumber(ARGV[2])
local sets = tonumber(ARGV[3])

if #KEYS > 1 + sets then
  local open = tonumber(redis.call('GET', KEYS[2 + sets]) or '0') or 0
  if open > now then
    return {3, open - now, 0}
  end
end

local cooling, cooling_set = 0, 0
for j = 1, sets do
  local until_ = tonumber(redis.call('GET', KEYS[1 + j]) or '0') or 0
  if until_ - now > cooling then
    cooling, cooling_set = until_ - now, j
  end
end
if cooling > 0 then
  return {2, cooling, cooling_set}
end

local fields, intervals, tolerances, costs, owners = {}, {}, {}, {}, {}
local at = 4
for j = 1, sets do
  local cost, count = tonumber(ARGV[at]), tonumber(ARGV[at + 1])
  at = at + 2
  for _ = 1, count do
    local n = #fields + 1
    fields[n], intervals[n], tolerances[n] = ARGV[at], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
    costs[n], owners[n] = cost, j
    at = at + 3
  end
end

local names = {}
for i = 1, #fields do
  names[3 * i - 2], names[3 * i - 1], names[3 * i] = fields[i], fields[i] .. ':interval', fields[i] .. ':granted'
end
local stored = redis.call('HMGET', KEYS[1], unpack(names))
local tats = {}
for i = 1, #fields do
  local tat = tonumber(stored[3 * i - 2]) or 0
  local was, granted_at = tonumber(stored[3 * i - 1]), tonumber(stored[3 * i])
  if was and granted_at and was ~= intervals[i] and tat > granted_at then
    tat = granted_at + math.ceil((tat - granted_at) / was * intervals[i])
  end
  tats[i] = math.max(tat, now - slack)
end
local granted, wait, wait_set = 0, 0, 0
while granted < wanted and wait == 0 do
  for i = 1, #fields do
    if tats[i] - tolerances[i] - now > wait then
      wait, wait_set = tats[i] - tolerances[i] - now, owners[i]
    end
  end
  if wait == 0 then
    granted = granted + 1
    for i = 1, #fields do
      tats[i] = tats[i] + intervals[i] * costs[i]
    end
  end
end
if granted == 0 then
  return {0, wait, wait_set}
end
if #KEYS > 2 + sets then
  local probes, window = tonumber(ARGV[at]), tonumber(ARGV[at + 1])
  local taken = redis.call('INCRBY', KEYS[3 + sets], granted)
  if taken == granted then
    redis.call('PEXPIRE', KEYS[3 + sets], math.max(1, math.ceil(window / 1000)))
  end
  if taken > probes then
    local left = math.max(1, redis.call('PTTL', KEYS[3 + sets])) * 1000
    return {4, math.min(left, 1000000), 0}
  end
end
local update, keep = {}, 0
for i = 1, #fields do
  update[6 * i - 5], update[6 * i - 4] = fields[i], tats[i]
  update[6 * i - 3], update[6 * i - 2] = names[3 * i - 1], intervals[i]
  update[6 * i - 1], update[6 * i] = names[3 * i], now
  keep = math.max(keep, tats[i] - now)
end
redis.call('HSET', KEYS[1], unpack(update))
-- Idle state expires once every quota would admit a full burst anyway; the
-- hash also holds quotas this request did not take (a limit it does not
-- match, token quotas), so their state is only ever kept longer, never cut.
local ttl = math.ceil(keep / 1000) + 1000
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return {1, granted, 0}

"""`RedisLimiter`: the GCRA of `gcra.py` in one Lua script, so replicas share every limit.

The script reads the clock from Redis (`TIME`), so replicas with skewed clocks agree, and it
checks all of a request's buckets before consuming any (atomic: Redis runs one script at a
time). Each bucket is a single string key (its `tat`) that expires once the bucket is full.
Keys carry the caller's prefix, so test runs and deployments can share one Redis.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from talkloop.server.limits.limiter import WINDOW_S, Decision, LimitState, RateLimit

# KEYS[i]: bucket i. ARGV[1]: window (s); ARGV[2i], ARGV[2i+1]: limit and cost of bucket i.
# Returns {admitted (0/1), {remaining, reset_s, retry_after_s} per bucket (as it stands when
# refused)}; floats as strings
# because Redis truncates Lua numbers to integers.
GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGV[1])
local admitted = 1
local new_tats = {}
local states = {}
local unchanged = {}
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i])
  local cost = tonumber(ARGV[2 * i + 1])
  local interval = window / limit
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  local base = math.max(tat, now)
  local new_tat = base + cost * interval
  local excess = new_tat - now - window
  local backlog = new_tat - now
  local retry = 0
  if excess > 1e-9 then
    admitted = 0
    backlog = base - now
    retry = excess
  end
  local remaining = math.max(0, math.floor((window - backlog) / interval + 1e-9))
  new_tats[i] = new_tat
  states[i] = {remaining, string.format('%.6f', backlog), string.format('%.6f', retry)}
  if retry == 0 then  -- as the bucket stands, in case another limit refuses
    unchanged[i] = {math.max(0, math.floor((window - (base - now)) / interval + 1e-9)),
                    string.format('%.6f', base - now), '0'}
  else
    unchanged[i] = states[i]
  end
end
if admitted == 0 then
  return {0, unchanged}
end
if admitted == 1 then
  for i = 1, #KEYS do
    local ttl_ms = math.ceil((new_tats[i] - now) * 1000) + 1000
    redis.call('SET', KEYS[i], string.format('%.6f', new_tats[i]), 'PX', ttl_ms)
  end
end
return {admitted, states}
"""


class RedisLimiter:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._script = client.register_script(GCRA_SCRIPT)

    @classmethod
    def from_url(cls, url: str, prefix: str) -> RedisLimiter:
        client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        return cls(client, prefix)

    def acquire(self, limits: Sequence[RateLimit]) -> Decision:
        if not limits:
            return Decision(True, ())
        keys = [self._prefix + lim.bucket for lim in limits]
        args: list[float] = [WINDOW_S]
        for lim in limits:
            args += [lim.limit, lim.cost]
        admitted, raw_states = self._script(keys=keys, args=args)
        states = tuple(
            LimitState(lim.limit, int(remaining), float(reset), float(retry))
            for lim, (remaining, reset, retry) in zip(limits, raw_states, strict=True)
        )
        return Decision(bool(admitted), states)

    def close(self) -> None:
        self._client.close()

"""Rate limits (requests and tokens per minute per key) behind the `RateLimiter` strategy.

`InProcessLimiter` by default; `RedisLimiter` when `redis_url` is set, so replicas share limits.
"""

from talkloop.server.limits.limiter import Decision, RateLimit, RateLimiter, build_limiter

__all__ = ["Decision", "RateLimit", "RateLimiter", "build_limiter"]

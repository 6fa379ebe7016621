"""Redis keys and the Lua compare-and-set scripts of the export job lifecycle.

Every transition runs as one script, so a reader, the runner and the sweeper can never
interleave half-way. Scripts only HSET keys they have just seen exist: HSET keeps the TTL
set at creation, and a job that expired is never recreated without one. Lease deadlines are
taken from the Redis server clock (TIME), so hosts with skewed clocks agree on them.
"""

from __future__ import annotations

import hashlib

JOB_PREFIX = "trailcam:export:"
ACTIVE_KEY = "trailcam:exports:active"  # sorted set: job id scored by its lease deadline (ms)
IDEMPOTENCY_PREFIX = "trailcam:export-idem:"
SWEEP_LOCK_KEY = "trailcam:exports:sweep-lock"
WORKER_LOST = "export worker lost"


def job_key(job_id: str) -> str:
    """The hash holding one job."""
    return JOB_PREFIX + job_id


def idempotency_key(owner: int, header_value: str) -> str:
    """The mapping of one API key's Idempotency-Key to its job (hashed: headers are client text)."""
    digest = hashlib.sha256(header_value.encode()).hexdigest()
    return f"{IDEMPOTENCY_PREFIX}{owner}:{digest}"


_NOW_MS = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: job, active, idempotency mapping. ARGV: ttl_ms, start_grace_ms, fingerprint ('' = none),
# job key prefix, job id, then field/value pairs. Returns {outcome, job id}.
CREATE = (
    _NOW_MS
    + """
if ARGV[3] ~= '' then
  local prev = redis.call('HMGET', KEYS[3], 'job_id', 'fingerprint')
  if prev[1] and redis.call('EXISTS', ARGV[4] .. prev[1]) == 1 then
    if prev[2] == ARGV[3] then return {'existing', prev[1]} end
    return {'conflict', prev[1]}
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'duplicate', ARGV[5]} end
local deadline = now_ms + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'lease_until_ms', deadline, unpack(ARGV, 6))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], deadline, ARGV[5])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[3], 'job_id', ARGV[5], 'fingerprint', ARGV[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[1])
end
return {'created', ARGV[5]}
"""
)

# KEYS: job, active. ARGV: job id, lease_ms, then field/value pairs. 1 when the job is still
# processing (lease renewed), 0 when it is gone, deleted or already final.
RENEW = (
    _NOW_MS
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then return 0 end
local deadline = now_ms + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'lease_until_ms', deadline, unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], deadline, ARGV[1])
return 1
"""
)

# KEYS: job, active. ARGV: job id. Ends the lease of a processing job now (its task ended without finishing it:
# nothing will renew it), so the next read or sweep fails it as a lost worker's. 1 when it was processing.
LAPSE = (
    _NOW_MS
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then return 0 end
redis.call('HSET', KEYS[1], 'lease_until_ms', now_ms - 1)
redis.call('ZADD', KEYS[2], now_ms - 1, ARGV[1])
return 1
"""
)

# KEYS: job, active. ARGV: job id, expected status, then field/value pairs (must set 'status').
# 1 when the job was in the expected status and now holds the new fields, 0 otherwise.
TRANSITION = """
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS: job, active. ARGV: job id, error text, timestamp. Fails a processing job whose lease
# lapsed, then returns {lapsed 0|1, field, value, ...}; {} when the job does not exist.
READ = (
    _NOW_MS
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {}
end
local lapsed = 0
if status == 'processing' then
  local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until_ms'))
  if lease and lease < now_ms then
    redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[2], 'updated_at', ARGV[3], 'finished_at', ARGV[3])
    redis.call('ZREM', KEYS[2], ARGV[1])
    lapsed = 1
  end
end
local out = redis.call('HGETALL', KEYS[1])
table.insert(out, 1, lapsed)
return out
"""
)

# KEYS: job, active. ARGV: job id, owner. Deletes the job when that owner created it, and its
# Idempotency-Key mapping while that still names this job, so a retry can never land between the
# two (and a mapping a retry already moved to a newer job stays). The mapping's name is read
# from the job hash: the caller does not know the header. Returns the job's fields; {} when it
# does not exist or belongs to another key (no delete).
DELETE = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner or owner ~= ARGV[2] then return {} end
local out = redis.call('HGETALL', KEYS[1])
local mapping = redis.call('HGET', KEYS[1], 'idempotency_key')
if mapping and mapping ~= '' and redis.call('HGET', mapping, 'job_id') == ARGV[1] then
  redis.call('DEL', mapping)
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return out
"""

# KEYS: job. ARGV: field/value pairs. Sets them on a job that has ended (completed or failed) and returns 1;
# 0 and no write when the job is gone or still processing, so a late record never recreates a deleted job
# (HSET on an existing hash keeps its TTL) and never touches what a transition writes.
RECORD_ENDED = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'completed' and status ~= 'failed' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# KEYS: sweep lock. ARGV: token. Releases the lock only when this sweeper still holds it.
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

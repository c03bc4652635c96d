"""The Lua scripts of the Redis engine: every change of a sequence is one script.

Nonce values never pass through a Lua number (a double, exact only below 2**53):
they stay decimal strings, are compared as zero-padded strings of equal length,
and the arithmetic is done by ``HINCRBY`` (exact signed 64-bit) with the result
read back as a string. Times are server ``TIME`` readings: microseconds since the
epoch (about 1.7e15, exact as a double) for comparisons and expiries, and the
nanosecond string ``seconds .. micros .. "000"`` for values.

Keys of one sequence (``P`` = ``shmnonce:{name}:``, one Redis Cluster hash slot):

* ``P seq``   hash: ``gen`` (generation, set at creation), ``last``, ``total``,
  ``created`` (ns), ``prev_us`` (previous clock reading), ``regressions``,
  ``qseq`` (queue arrival counter), ``entries``, ``waits``, ``lease_lost``;
* ``P dead``  set of unlinked generations (handles of those get an error);
* ``P lease`` string: the token of the section's holder, with a ``PX`` expiry;
* ``P queue`` sorted set: waiting tokens scored by arrival (FIFO);
* ``P alive`` hash: waiting token -> ``expiry_us:lease_ms`` (renewed while it waits);
* ``P w:TOKEN`` list: a waiter's mailbox; the hand-off pushes its nonce there;
* ``P records`` set of record names, ``P r:NAME`` a record's value.
"""

from __future__ import annotations

__all__ = ["ENTER", "INIT", "ISSUE", "JUMP", "LEAVE", "MAX_VALUE", "RENEW", "UNLINK"]

MAX_VALUE = 2**63 - 1
"""The largest value a Redis sequence holds (``HINCRBY`` is signed 64-bit)."""

_PRELUDE = r"""
local MAX = '9223372036854775807'
-- a >= b for canonical decimal strings: the longer is larger; equal lengths are
-- compared byte by byte (no locale, no number)
local function ge(a, b)
  if #a ~= #b then return #a > #b end
  for i = 1, #a do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return true
end
-- canonical (no leading zero) and at most 2**63-1
local function valid(s)
  return type(s) == 'string' and #s <= 19 and string.find(s, '^[1-9]%d*$') ~= nil
    and (#s < 19 or ge(MAX, s)) or s == '0'
end
local function fail(kind, msg) error({err = 'SHMNONCE_' .. kind .. ' ' .. msg}) end
-- server time: (ns string, microseconds as a number, microseconds string)
local function clock()
  local t = redis.call('TIME')
  local us = t[1] .. string.sub('000000', 1, 6 - #t[2]) .. t[2]
  return us .. '000', tonumber(us), us
end
local function create(S, gen, now)
  redis.call('DEL', S)
  redis.call('HSET', S, 'gen', gen, 'last', '0', 'created', now, 'total', '0',
             'prev_us', '0', 'regressions', '0', 'qseq', '0', 'entries', '0', 'waits', '0',
             'lease_lost', '0', 'recreated', '0')
end
-- last, previous clock reading (us) and total of this handle's generation; the
-- sequence is created again under the same generation if Redis lost it
local function load(S, D, gen, now)
  local h = redis.call('HMGET', S, 'gen', 'last', 'prev_us', 'total')
  if h[1] == gen then
    if not valid(h[2]) then fail('STATE', 'holds an invalid last value') end
    return h[2], tonumber(h[3]) or 0, tonumber(h[4]) or 0
  end
  if h[1] then fail('STATE', 'was unlinked and created again; attach again') end
  if redis.call('SISMEMBER', D, gen) == 1 then fail('STATE', 'was unlinked; attach again') end
  -- gone without unlink (restart without persistence, failover, eviction):
  -- continue from the server clock under the same generation
  create(S, gen, now)
  redis.call('HSET', S, 'recreated', '1')
  return '0', 0, 0
end
local function check(S, D, gen, now)
  return (load(S, D, gen, now))
end
-- issue one value: max(last + 1, now). Three commands in the common case.
local function issue(S, D, gen)
  local now, now_us, now_s = clock()
  local last, prev, total = load(S, D, gen, now)
  if now_us + 1000 < prev then redis.call('HINCRBY', S, 'regressions', 1) end
  local v = now
  if ge(last, now) then
    if last == MAX then fail('RANGE', 'reached 2**63-1, the largest value Redis holds') end
    redis.call('HINCRBY', S, 'last', 1)  -- exact; its reply (a Lua number) is not used
    v = redis.call('HGET', S, 'last')
  end
  -- total counts calls: below 2**53 for centuries, exact as a number
  redis.call('HSET', S, 'last', v, 'prev_us', now_s, 'total', string.format('%d', total + 1))
  return v
end
"""

_SECTION = r"""
-- KEYS: S, D, L (lease), Q (queue), A (alive); ARGV[1] gen, ARGV[2] mailbox prefix
local S, D, L, Q, A = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local gen, box = ARGV[1], ARGV[2]
-- the first waiter still alive (dead ones are dropped)
local function first_live(now_us)
  while true do
    local head = redis.call('ZRANGE', Q, 0, 0)[1]
    if not head then return nil, nil end
    local mark = redis.call('HGET', A, head)
    if mark then
      local exp, lease = string.match(mark, '^(%d+):(%d+)$')
      if exp and tonumber(exp) >= now_us then return head, lease end
    end
    redis.call('ZREM', Q, head)
    redis.call('HDEL', A, head)
  end
end
-- give the section to a waiter: lease, nonce issued now, nonce in its mailbox
local function grant(tok, lease_ms)
  local n = issue(S, D, gen)  -- first: if it fails, nothing below is written
  redis.call('ZREM', Q, tok)
  redis.call('HDEL', A, tok)
  redis.call('SET', L, tok, 'PX', lease_ms)
  redis.call('HINCRBY', S, 'entries', 1)
  return n
end
local function hand_off(now_us)
  local head, lease_ms = first_live(now_us)
  if head then
    local n = grant(head, lease_ms)
    local mb = box .. head
    redis.call('RPUSH', mb, n)
    redis.call('PEXPIRE', mb, 2 * tonumber(lease_ms) + 60000)
  end
end
"""

INIT = _PRELUDE + r"""
-- KEYS: S, D; ARGV[1] candidate generation. Returns the live generation.
local S, D = KEYS[1], KEYS[2]
local t = redis.call('TYPE', S)['ok']
if t == 'none' then
  local now = clock()
  create(S, ARGV[1], now)
  return ARGV[1]
end
if t ~= 'hash' then fail('STATE', 'key ' .. S .. ' is a ' .. t .. ', not a sequence') end
local gen = redis.call('HGET', S, 'gen')
if not gen then fail('STATE', 'key ' .. S .. ' is not a shmnonce sequence (no generation)') end
check(S, D, gen, '0')
return gen
"""

_FAST_ISSUE = r"""
-- The common case inline (no function definitions run): this handle's generation,
-- a valid last value below the server clock. Anything else takes issue() below.
do
  local S = KEYS[1]
  local t = redis.call('TIME')
  local us = t[2]
  if #us < 6 then us = string.sub('000000', 1, 6 - #us) .. us end
  local now_s = t[1] .. us
  local now = now_s .. '000'
  local h = redis.call('HMGET', S, 'gen', 'last', 'prev_us', 'total')
  local last = h[2]
  if h[1] == ARGV[1] and last and (last == '0' or string.find(last, '^[1-9]%d*$')) then
    local below = #last < #now
    if #last == #now then
      for i = 1, #now do
        local x, y = string.byte(last, i), string.byte(now, i)
        if x ~= y then below = x < y break end
      end
    end
    if below then  -- then now = max(last + 1, now), and now < 2**63-1
      if tonumber(now_s) + 1000 < (tonumber(h[3]) or 0) then
        redis.call('HINCRBY', S, 'regressions', 1)
      end
      redis.call('HSET', S, 'last', now, 'prev_us', now_s,
                 'total', string.format('%d', (tonumber(h[4]) or 0) + 1))
      return now
    end
  end
end
"""

ISSUE = _FAST_ISSUE + _PRELUDE + r"""
-- KEYS: S, D; ARGV[1] gen
return issue(KEYS[1], KEYS[2], ARGV[1])
"""

JUMP = _PRELUDE + r"""
-- KEYS: S, D; ARGV[1] gen, ARGV[2] delta (decimal, 0 .. 2**63-1).
-- last = max(last, now) + delta, added by HINCRBY on a scratch field so that an
-- overflow changes nothing.
local S, D = KEYS[1], KEYS[2]
local now = clock()
local last = check(S, D, ARGV[1], now)
local base = now
if ge(last, now) then base = last end
redis.call('HSET', S, 'scratch', base)
local r = redis.pcall('HINCRBY', S, 'scratch', ARGV[2])
if type(r) == 'table' and r.err then
  redis.call('HDEL', S, 'scratch')
  fail('JUMP', 'the new last value would pass 2**63-1 (last value ' .. last .. ')')
end
local v = redis.call('HGET', S, 'scratch')
redis.call('HDEL', S, 'scratch')
redis.call('HSET', S, 'last', v)
return v
"""

ENTER = _PRELUDE + _SECTION + r"""
-- ARGV[3] token, ARGV[4] lease_ms. Returns {1, nonce} when entered, else {0, lease pttl}.
local tok, lease_ms = ARGV[3], ARGV[4]
local cur = redis.call('GET', L)
if cur == tok then
  -- granted by a hand-off whose message we have not read yet
  local n = redis.call('LPOP', box .. tok)
  redis.call('DEL', box .. tok)
  if n then return {1, n} end
  n = issue(S, D, gen)
  return {1, n}
end
if not cur and redis.call('ZCARD', Q) == 0 then
  -- nobody holds or waits: enter without queueing
  local n = issue(S, D, gen)
  redis.call('SET', L, tok, 'PX', lease_ms)
  redis.call('HINCRBY', S, 'entries', 1)
  return {1, n}
end
local _, now_us = clock()
check(S, D, gen, clock())
redis.call('HSET', A, tok, string.format('%d', now_us + 1000 * tonumber(lease_ms)) .. ':' .. lease_ms)
local queued = redis.call('ZSCORE', Q, tok)
if not queued then
  local seq = redis.call('HINCRBY', S, 'qseq', 1)
  redis.call('ZADD', Q, seq, tok)
end
if not cur then
  local head, head_lease = first_live(now_us)
  if head == tok then return {1, grant(tok, lease_ms)} end
  if head then
    -- the lease expired and its next waiter has not noticed yet: wake it
    local n = grant(head, head_lease)
    local mb = box .. head
    redis.call('RPUSH', mb, n)
    redis.call('PEXPIRE', mb, 2 * tonumber(head_lease) + 60000)
  end
end
if not queued then redis.call('HINCRBY', S, 'waits', 1) end
return {0, redis.call('PTTL', L)}
"""

LEAVE = _PRELUDE + _SECTION + r"""
-- ARGV[3] token, ARGV[4] '1' if the caller held the section. Leaves or withdraws;
-- returns 1 if the token held the lease (it is handed to the next live waiter).
local tok, was_held = ARGV[3], ARGV[4]
local cur = redis.call('GET', L)
redis.call('DEL', box .. tok)
if cur == tok then
  redis.call('DEL', L)
  if redis.call('ZCARD', Q) > 0 then
    local _, now_us = clock()
    hand_off(now_us)
  end
  return 1
end
redis.call('ZREM', Q, tok)
redis.call('HDEL', A, tok)
if was_held == '1' then redis.call('HINCRBY', S, 'lease_lost', 1) end
if not cur then
  local _, now_us = clock()
  hand_off(now_us)
end
return 0
"""

RENEW = r"""
-- KEYS: L, Q, A; ARGV[1] lease_ms, ARGV[2..] tokens of this process.
-- Holder: extend the lease; waiter: refresh its alive mark. Returns per token
-- 2 (holds), 1 (waits), 0 (neither: lost or not queued yet).
local L, Q, A = KEYS[1], KEYS[2], KEYS[3]
local lease_ms = ARGV[1]
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local holder = redis.call('GET', L)
local out = {}
for i = 2, #ARGV do
  local tok = ARGV[i]
  if tok == holder then
    redis.call('PEXPIRE', L, lease_ms)
    out[#out + 1] = 2
  elseif redis.call('ZSCORE', Q, tok) then
    redis.call('HSET', A, tok, string.format('%d', now_us + 1000 * tonumber(lease_ms)) .. ':' .. lease_ms)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

UNLINK = r"""
-- KEYS: S, D, L, Q, A, R (record names); ARGV[1] record key prefix.
-- Deletes everything of the sequence and marks its generation dead.
local S, D, L, Q, A, R = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local gen = redis.call('HGET', S, 'gen')
if gen then redis.call('SADD', D, gen) end
for _, name in ipairs(redis.call('SMEMBERS', R)) do redis.call('DEL', ARGV[1] .. name) end
redis.call('DEL', S, L, Q, A, R)
return gen or false
"""

"""Lua scripts of the `views` projection: each runs atomically in Redis (change + checkpoint).

The live projector's calls are guarded: they name the loss marker (`infra.views.marker_key`) and
the token the projector knows, and a script refuses to write anything (error `VIEWSLOST`) unless
the marker holds that token. So a Redis that lost its data (FLUSHALL, a restart without
persistence) is never half-written by the live projector: it notices and rebuilds instead. A
replay building a generation of its own passes no marker.
"""

from __future__ import annotations

LOST = "VIEWSLOST"  # the error a guarded script answers when the marker is not the one named


def _guard(key: str, token: str) -> str:
    """Lua: refuse (before any write) unless the marker named by `key` holds `token`."""
    return f"""
if {key} and {key} ~= '' and redis.call('GET', {key}) ~= {token} then
  return redis.error_reply('{LOST} views marker ' .. {key} .. ' is gone or changed')
end
"""


# A batch of domain events, each applied as it comes (one script call instead of one per event:
# packing a call per event cost the projector more than Redis spent on it). For each event the
# device's `version` is the checkpoint: the event applies only directly after its predecessor
# (compare-and-set on version - 1); an older one is skipped, a newer one (a gap: another
# instance holds its predecessor) is left for a retry.
# ARGV[1]: JSON [[keys, args], ...] (all strings), per event:
#   keys: device hash, online set, then one key per index operation;
#   args: version, doc, online flag ("1", "0" or ""), online_at (epoch ms), device id, changes
#         channel ("" = do not publish), commands JSON ("" = unchanged), then one operation per
#         extra key: zadd, sadd or srem (of the device id), incr or decr (a counter), or an
#         operation with arguments, its parts joined by \31 (unit separator, which JSON text
#         never holds raw): zadds score member, zrem member, hset field value ..., hincr
#         field n; `ifexists` (its key: an alert's hash) skips the event's remaining operations
#         when that key does not exist (an alert raised before the views kept alerts: no
#         partial hash, no count for it); `keep n alert-prefix rule-index-prefix index ...`
#         (its key: a device's cleared alerts by clear version) removes all but the newest n
#         cleared alerts, each from that set, every index named and its rule's, with its hash.
#         `ztrim n` keeps the newest n members (by score) of its sorted set.
# ARGV[2], ARGV[3] (optional): the loss marker's key and the token it must hold (see above).
# Returns per event: 1 applied (and publishes the device id), 0 already applied, 2 gap.
EVENTS = (
    _guard("ARGV[2]", "ARGV[3]")
    + """
local function split(s)
  local out, start = {}, 1
  while true do
    local i = string.find(s, '\\31', start, true)
    if not i then
      out[#out + 1] = string.sub(s, start)
      return out
    end
    out[#out + 1] = string.sub(s, start, i - 1)
    start = i + 1
  end
end

local function apply(K, A)
  local h = K[1]
  local v = tonumber(A[1])
  local cur = tonumber(redis.call('HGET', h, 'version') or '0')
  if cur >= v then return 0 end
  if cur ~= v - 1 then return 2 end
  redis.call('HSET', h, 'version', A[1], 'doc', A[2])
  if A[7] ~= '' then redis.call('HSET', h, 'commands', A[7]) end
  local id = A[5]
  local flag = A[3]
  if flag ~= '' then
    local at = tonumber(A[4])
    local old_at = tonumber(redis.call('HGET', h, 'online_at') or '-1')
    local old = redis.call('HGET', h, 'online') or ''
    if at > old_at or (at == old_at and flag > old) then
      redis.call('HSET', h, 'online', flag, 'online_at', A[4])
      if flag == '1' then redis.call('SADD', K[2], id) else redis.call('SREM', K[2], id) end
    end
  end
  local skip = false
  for i = 3, #K do
    local op = A[i + 5]
    if skip then break
    elseif op == 'zadd' then redis.call('ZADD', K[i], 0, id)
    elseif op == 'sadd' then redis.call('SADD', K[i], id)
    elseif op == 'incr' then redis.call('INCR', K[i])
    elseif op == 'decr' then redis.call('DECR', K[i])
    elseif op == 'srem' then redis.call('SREM', K[i], id)
    else
      local p = split(op)
      if p[1] == 'zadds' then redis.call('ZADD', K[i], p[2], p[3])
      elseif p[1] == 'zrem' then redis.call('ZREM', K[i], p[2])
      elseif p[1] == 'hset' then redis.call('HSET', K[i], unpack(p, 2))
      elseif p[1] == 'hincr' then redis.call('HINCRBY', K[i], p[2], p[3])
      elseif p[1] == 'ifexists' then skip = redis.call('EXISTS', K[i]) == 0
      elseif p[1] == 'ztrim' then redis.call('ZREMRANGEBYRANK', K[i], 0, -tonumber(p[2]) - 1)
      elseif p[1] == 'keep' then
        local over = redis.call('ZCARD', K[i]) - tonumber(p[2])
        if over > 0 then
          for _, aid in ipairs(redis.call('ZRANGE', K[i], 0, over - 1)) do
            redis.call('ZREM', K[i], aid)
            redis.call('DEL', p[3] .. aid)
            local rule = string.match(aid, '^[^.]*%.([^.]*)%.')
            if rule then redis.call('ZREM', p[4] .. rule, aid) end
            for j = 5, #p do redis.call('ZREM', p[j], aid) end
          end
        end
      else return redis.error_reply('unknown index operation ' .. p[1]) end
    end
  end
  if A[6] ~= '' then redis.call('PUBLISH', A[6], id) end
  return 1
end

local out = {}
for i, e in ipairs(cjson.decode(ARGV[1])) do out[i] = apply(e[1], e[2]) end
return out
"""
)

# One ingest batch, reduced per device to maxima (see views_plan.IngestPlan): every update is
# "keep the larger" under a total order, so re-applying or reordering changes nothing.
# KEYS: the online set.
# ARGV: device key prefix, changes channel ("" = do not publish), the batch as JSON (numbers
#   as text):
#   [[[id, last_seen, status_at, flag, reported_at, reported, [field, ts, json, ...],
#      reported config version, reported history], ...],
#    [[readings key, expire at (epoch s), [reading id, ...]], ...]]   ("" = nothing)
#   the reported history: [its key, how many to keep, received_at, member, ...] (every reported
#   state of the batch, scored by when it was received; the newest kept) or "" (none)
# ARGV[4], ARGV[5] (optional): the loss marker's key and the token it must hold.
# Publishes each changed device id on the changes channel; returns how many changed.
INGEST = (
    _guard("ARGV[4]", "ARGV[5]")
    + """
local function chunked(cmd, key, list)
  local out = {}
  for s = 1, #list, 1000 do
    local part = redis.call(cmd, key, unpack(list, s, math.min(s + 999, #list)))
    if type(part) == 'table' then
      for _, x in ipairs(part) do out[#out + 1] = x end
    end
  end
  return out
end

local batch = cjson.decode(ARGV[3])
local changed = 0
for _, d in ipairs(batch[1]) do
  local id = d[1]
  local h = ARGV[1] .. id
  local seen, status_at, flag, reported_at, reported, metrics = d[2], d[3], d[4], d[5], d[6], d[7]
  local config_version = d[8] or ''
  local ch = false
  if #metrics > 0 then
    local fields = {}
    for k = 1, #metrics, 3 do fields[#fields + 1] = metrics[k] end
    local olds = chunked('HMGET', h, fields)
    local sets = {}
    for k = 1, #fields do
      local ts = tonumber(metrics[3 * k - 1])
      local js = metrics[3 * k]
      local old = olds[k]
      local apply = true
      if old then
        local old_ts = tonumber(string.match(old, '^{"ts":(%-?%d+)'))
        if old_ts then apply = ts > old_ts or (ts == old_ts and js > old) end
      end
      if apply then
        sets[#sets + 1] = fields[k]
        sets[#sets + 1] = js
      end
    end
    if #sets > 0 then
      chunked('HSET', h, sets)
      ch = true
    end
  end
  if seen ~= '' then
    local old = tonumber(redis.call('HGET', h, 'last_seen') or '-1')
    if tonumber(seen) > old then
      redis.call('HSET', h, 'last_seen', seen)
      ch = true
    end
  end
  if status_at ~= '' then
    local at = tonumber(status_at)
    local old_at = tonumber(redis.call('HGET', h, 'online_at') or '-1')
    local old = redis.call('HGET', h, 'online') or ''
    if at > old_at or (at == old_at and flag > old) then
      redis.call('HSET', h, 'online', flag, 'online_at', status_at)
      if flag == '1' then redis.call('SADD', KEYS[1], id) else redis.call('SREM', KEYS[1], id) end
      ch = true
    end
  end
  if reported_at ~= '' then
    local at = tonumber(reported_at)
    local old_at = tonumber(redis.call('HGET', h, 'reported_at') or '-1')
    local apply = at > old_at
    if at == old_at then
      local old = redis.call('HGET', h, 'reported') or ''
      apply = reported > old
      if reported == old then
        apply = config_version > (redis.call('HGET', h, 'reported_config_version') or '')
      end
    end
    if apply then
      redis.call('HSET', h, 'reported', reported, 'reported_at', reported_at)
      if config_version == '' then
        redis.call('HDEL', h, 'reported_config_version')
      else
        redis.call('HSET', h, 'reported_config_version', config_version)
      end
      ch = true
    end
  end
  local rh = d[9]
  if type(rh) == 'table' and #rh > 2 then
    for k = 3, #rh, 2 do redis.call('ZADD', rh[1], rh[k], rh[k + 1]) end
    redis.call('ZREMRANGEBYRANK', rh[1], 0, -tonumber(rh[2]) - 1)
  end
  if ch then
    changed = changed + 1
    if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[2], id) end
  end
end
for _, r in ipairs(batch[2]) do
  chunked('PFADD', r[1], r[3])
  redis.call('EXPIREAT', r[1], r[2])
end
return changed
"""
)

# The checkpoint of domain events after a batch (see infra.views): folds the stream sequences of
# the messages done (applied, skipped as applied, dead-lettered) into the contiguous prefix S of
# the EVENTS stream and moves the position P to the largest event position in that prefix.
# A message done past a gap waits in the `ahead` hash until the gap closes; S and P never move
# backwards, whatever the order or repetition of calls (several instances may call it).
# KEYS: position, position:seq, position:ahead, and (optional) the loss marker.
# ARGV: the token the marker must hold ("" with no marker), then pairs of stream sequence, event
# position (0 = unknown), in any order.
# Returns the position P after the call.
CHECKPOINT = (
    _guard("KEYS[4]", "ARGV[1]")
    + """
local function int(n) return string.format('%d', n) end
local s = tonumber(redis.call('GET', KEYS[2]) or '0')
local p = tonumber(redis.call('GET', KEYS[1]) or '0')
local s0, p0 = s, p
local done = {}
for i = 2, #ARGV, 2 do
  local seq = tonumber(ARGV[i])
  if seq > s then done[seq] = tonumber(ARGV[i + 1]) end
end
local parked = redis.call('EXISTS', KEYS[3]) == 1
while true do
  local v = done[s + 1]
  if parked then
    local held = redis.call('HGET', KEYS[3], int(s + 1))
    if held then
      redis.call('HDEL', KEYS[3], int(s + 1))
      v = v or tonumber(held)
    end
  end
  if not v then break end
  s = s + 1
  done[s] = nil
  if v > p then p = v end
end
for seq, position in pairs(done) do
  if seq > s then redis.call('HSET', KEYS[3], int(seq), int(position)) end
end
if s ~= s0 then redis.call('SET', KEYS[2], int(s)) end
if p ~= p0 then redis.call('SET', KEYS[1], int(p)) end
return int(p)
"""
)

# Seed the checkpoint of a projection that ran before it kept one: every message up to the
# consumer's ack floor is applied. Only when no checkpoint exists; the position never moves back.
# KEYS: position, position:seq. ARGV: stream sequence, event position.
SEED = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[1])
local p = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[2]) > p then redis.call('SET', KEYS[1], ARGV[2]) end
return 1
"""

# Flag the views incomplete, but only while the loss marker is absent (a switch that wrote it
# and removed the flag in one step must not be followed by a stale flag).
# KEYS: the marker, the rebuilding flag. ARGV: the flag's value. Returns 1 if flagged.
FLAG = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""

# A replay's switch: readers (and the live projector) move to the new generation in one step,
# only if the generation being built is still recorded (a Redis that lost its data during the
# replay lost the rebuild too: refused with VIEWSLOST).
# KEYS: current, replay. ARGV: new generation, old generation.
SWITCH = f"""
if redis.call('HGET', KEYS[2], 'building') ~= ARGV[1] then
  return redis.error_reply('{LOST} the generation being built is gone: Redis lost its data')
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'retiring', ARGV[2])
redis.call('HDEL', KEYS[2], 'building')
return 1
"""

# The end of a replay's drain: the generation in use holds everything the log held at the
# switch. Unless Redis lost it meanwhile (`current` no longer names it: VIEWSLOST), the loss
# marker is written if absent (after a loss: the views hold the log again) and the rebuilding
# flag removed, in one step: readers get the rebuilt views only once they are whole.
# KEYS: current, marker, rebuilding. ARGV: the generation, a new token.
# Returns the marker's token.
FINISH = f"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('{LOST} generation ' .. ARGV[1] .. ' is no longer in use')
end
redis.call('SET', KEYS[2], ARGV[2], 'NX')
redis.call('DEL', KEYS[3])
return redis.call('GET', KEYS[2])
"""

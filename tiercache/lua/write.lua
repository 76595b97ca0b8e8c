-- Apply a write, a delete or a clear, then announce it: one atomic step, publish last.
--
-- KEYS[1] meta hash (seq, epoch), KEYS[2] invalidation log (stream),
-- KEYS[3] value, KEYS[4] tombstone, KEYS[5] fill lease (not given for a clear)
-- ARGV[1] op: "S" set, "D" delete, "C" clear (the caller already unlinked the keys)
-- ARGV[2] proposed version (an integer below 2^53)
-- ARGV[3] envelope (set), ARGV[4] value TTL in ms (0: none), ARGV[5] tombstone TTL in ms
-- ARGV[6] origin id, ARGV[7] channel, ARGV[8] log length bound, ARGV[9] encoded key
--
-- Returns {1, version, seq, existed} when applied (existed: a delete found a value; seq is -1
-- for a retry of a write already applied), or {0, current version} when the proposed version is
-- not above the stored one (the caller proposes again above it).

local function envelope_version(env)
  -- bytes 7..14 of an envelope (tiercache/envelope.py): big-endian, exact below 2^53
  if not env or #env < 34 or string.sub(env, 1, 2) ~= "TC" then
    return 0
  end
  local v = 0
  for i = 7, 14 do
    v = v * 256 + string.byte(env, i)
  end
  return v
end

local op = ARGV[1]
local version = tonumber(ARGV[2])
local existed = 0

if op ~= "C" then
  local current = envelope_version(redis.call("GET", KEYS[3]))
  local tomb = tonumber(redis.call("GET", KEYS[4]) or "0") or 0
  if tomb > current then
    current = tomb
  end
  if version == current then
    -- A retry of this very write (its reply was lost) finds it applied: answer as then.
    if (op == "S" and redis.call("GET", KEYS[3]) == ARGV[3]) or (op == "D" and tomb == version) then
      return {1, ARGV[2], -1}
    end
  end
  if version <= current then
    return {0, string.format("%.0f", current)}
  end
  if op == "S" then
    if tonumber(ARGV[4]) > 0 then
      redis.call("SET", KEYS[3], ARGV[3], "PX", ARGV[4])
    else
      redis.call("SET", KEYS[3], ARGV[3])
    end
    redis.call("DEL", KEYS[4])
  else
    existed = redis.call("DEL", KEYS[3])
    redis.call("SET", KEYS[4], ARGV[2], "PX", ARGV[5])
  end
  -- A fill that started before this write holds this lease: it can no longer commit.
  redis.call("DEL", KEYS[5])
end

local seq = redis.call("HINCRBY", KEYS[1], "seq", 1)
local epoch = redis.call("HGET", KEYS[1], "epoch")
if seq == 1 or not epoch then
  -- A counter that (re)starts gets a new epoch, so listeners can tell it from the lost one.
  local now = redis.call("TIME")
  epoch = now[1] .. string.format("%06d", tonumber(now[2]))
  redis.call("HSET", KEYS[1], "epoch", epoch)
end
local msg = "TC1 " .. epoch .. " " .. seq .. " " .. ARGV[2] .. " " .. ARGV[6] .. " " .. op
  .. "\n" .. ARGV[9]
redis.call("XADD", KEYS[2], "MAXLEN", "~", ARGV[8], "*", "m", msg)
redis.call("PUBLISH", ARGV[7], msg)
return {1, ARGV[2], seq, existed}

-- The filter's life cycle: completeness mark, rebuild, swap. Prepended with bloom_lib.lua.
--
-- KEYS[1] the filter's header; ARGV[1] the operation:
--
--   "complete" g   warm() loaded every key into generation g: set the completeness mark, if g
--                  is still current and whole. Returns 1, or 0 (lost or replaced meanwhile).
--   "begin" spec   a rebuild starts: a new empty generation (sized by ARGV[2..8], see
--                  read_spec) becomes "next", replacing an unfinished one; from now on every
--                  registration goes to it as well. Returns its number.
--   "swap" g       the rebuild of generation g has loaded every key: if g is still "next" and
--                  whole, it becomes current and complete in this one step and the old
--                  generation is dropped. Returns 1, or 0.
--   "abort" g      a rebuild of g failed: drop it if it is still "next". Returns 1 or 0.
--   "void"         forget the completeness mark (registrations were lost): the filter stops
--                  answering until warm() runs again. Returns 1.

local op = ARGV[1]

if op == "complete" then
  local g = redis.call("HGET", META, "gen")
  local p = params(g)
  if g ~= ARGV[2] or not intact(p) then
    return 0
  end
  redis.call("HSET", META, "complete", p.descriptor)
  return 1
end

if op == "begin" then
  local _, nxt = ensure(read_spec(2))
  forget(nxt)
  local fresh = create(read_spec(2))
  redis.call("HSET", META, "next", fresh.g)
  return fresh.g
end

if op == "swap" then
  local f = redis.call("HMGET", META, "gen", "next")
  if f[2] ~= ARGV[2] then
    return 0
  end
  local fresh = params(f[2])
  if not intact(fresh) then
    forget(fresh)
    redis.call("HDEL", META, "next")
    return 0
  end
  local old = params(f[1])
  redis.call("HSET", META, "gen", fresh.g, "complete", fresh.descriptor)
  redis.call("HDEL", META, "next")
  if old and old.g ~= fresh.g then
    forget(old)
  end
  return 1
end

if op == "abort" then
  if redis.call("HGET", META, "next") ~= ARGV[2] then
    return 0
  end
  forget(params(ARGV[2]))
  redis.call("HDEL", META, "next")
  return 1
end

if op == "void" then
  redis.call("HDEL", META, "complete")
  return 1
end

return redis.error_reply("unknown bloom_admin operation " .. tostring(op))

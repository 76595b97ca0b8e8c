-- Prelude of write.lua for tags and namespace generations (tiercache/tags.py): it runs first and
-- either answers {0, floor} (the writer proposes a version above floor again) or falls through
-- to write.lua, which stores and announces. A tag key is a hash: "i" the tag's invalidation
-- version, "w" the highest version written with the tag.
--
-- op "S" with tags: KEYS[4..] the tag keys. The proposed version must be above every "i" (a
-- write that lands after an invalidation survives it); each "w" is raised to it, and each tag
-- key is made to live at least as long as the entry (ARGV[4] ms, 0: no expiry).
-- op "G", a tag invalidation: KEYS[3] the tag key; the proposed version, above its "i" and "w"
-- (so above every entry written with the tag), becomes its "i". A tag key made here expires
-- after ARGV[12] ms.
-- op "N", a namespace generation: KEYS[3] the generation key; the proposed version, above it,
-- becomes it.

do
  local t_op = ARGV[1]
  local t_version = tonumber(ARGV[2])
  if t_op == "S" and #KEYS > 3 then
    local floor = 0
    for i = 4, #KEYS do
      local inv = tonumber(redis.call("HGET", KEYS[i], "i") or "0")
      if inv > floor then
        floor = inv
      end
    end
    if t_version <= floor then
      return {0, string.format("%.0f", floor)}
    end
    local ttl = tonumber(ARGV[4])
    for i = 4, #KEYS do
      local pttl = redis.call("PTTL", KEYS[i])
      local high = tonumber(redis.call("HGET", KEYS[i], "w") or "0")
      if t_version > high then
        redis.call("HSET", KEYS[i], "w", ARGV[2])
      end
      redis.call("HSETNX", KEYS[i], "i", "0")
      if ttl == 0 then
        if pttl >= 0 then
          redis.call("PERSIST", KEYS[i])
        end
      elseif pttl == -2 or (pttl >= 0 and pttl < ttl) then
        redis.call("PEXPIRE", KEYS[i], ttl)
      end
    end
  elseif t_op == "G" then
    local cur = redis.call("HMGET", KEYS[3], "i", "w")
    local floor = math.max(tonumber(cur[1] or "0"), tonumber(cur[2] or "0"))
    if t_version <= floor then
      return {0, string.format("%.0f", floor)}
    end
    local pttl = redis.call("PTTL", KEYS[3])
    local now = redis.call("TIME")
    local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
    redis.call("HSET", KEYS[3], "i", ARGV[2], "t", string.format("%.0f", now_us))
    if pttl == -2 or (pttl >= 0 and pttl < tonumber(ARGV[12])) then
      redis.call("PEXPIRE", KEYS[3], ARGV[12])
    end
  elseif t_op == "N" then
    local cur = tonumber(redis.call("GET", KEYS[3]) or "0")
    if t_version <= cur then
      return {0, string.format("%.0f", cur)}
    end
    redis.call("SET", KEYS[3], ARGV[2])
  end
end


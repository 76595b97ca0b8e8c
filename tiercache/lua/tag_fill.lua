-- Prelude of fill.lua and refresh.lua for a value with tags (tiercache/tags.py): a load that
-- began before one of its tags was invalidated read the origin before that change, so its value
-- is refused (returns 0). Else each tag's highest written version is raised to the value's and
-- the tag key made to live at least as long as the entry, then the script it prefixes runs.
--
-- The last ntags KEYS are the tag keys; the last four ARGV are: the value's TTL in ms (0: no
-- expiry), its version, the time (version clock, microseconds) the load began, ntags.

do
  local n = tonumber(ARGV[#ARGV])
  local since = tonumber(ARGV[#ARGV - 1])
  local t_version = tonumber(ARGV[#ARGV - 2])
  local ttl = tonumber(ARGV[#ARGV - 3])
  for i = #KEYS - n + 1, #KEYS do
    local inv = tonumber(redis.call("HGET", KEYS[i], "i") or "0")
    if inv >= since or inv >= t_version then
      return 0
    end
  end
  for i = #KEYS - n + 1, #KEYS do
    local pttl = redis.call("PTTL", KEYS[i])
    local high = tonumber(redis.call("HGET", KEYS[i], "w") or "0")
    if t_version > high then
      redis.call("HSET", KEYS[i], "w", string.format("%.0f", t_version))
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
end


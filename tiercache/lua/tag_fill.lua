-- Prelude of fill.lua and refresh.lua for a value with tags (tiercache/tags.py): a load that
-- began before one of its tags was invalidated read the origin before that change, so its value
-- is refused (returns 0). Else each tag's highest written version is raised to the value's and
-- the tag key made to live at least as long as the entry, then the script it prefixes runs.
--
-- When the load began is read on Redis' clock, like the invalidation's time (a tag key's "t"):
-- the load's lease (a fill) or refresh marker (a refresh) was set for lease_ms, so it began
-- lease_ms - PTTL ago (1 ms earlier, for PTTL's rounding). No lease or marker left: refused.
--
-- The last ntags KEYS are the tag keys; the last five ARGV are: the value's TTL in ms (0: no
-- expiry), its version, lease_ms, the index in KEYS of the lease or marker key, ntags.

do
  local n = tonumber(ARGV[#ARGV])
  local marker = KEYS[tonumber(ARGV[#ARGV - 1])]
  local lease_ms = tonumber(ARGV[#ARGV - 2])
  local t_version = tonumber(ARGV[#ARGV - 3])
  local ttl = tonumber(ARGV[#ARGV - 4])
  local pttl = redis.call("PTTL", marker)
  if pttl < 0 then
    return 0
  end
  local now = redis.call("TIME")
  local began = tonumber(now[1]) * 1000000 + tonumber(now[2]) - (lease_ms - pttl + 1) * 1000
  for i = #KEYS - n + 1, #KEYS do
    local cur = redis.call("HMGET", KEYS[i], "i", "t")
    if tonumber(cur[1] or "0") >= t_version or tonumber(cur[2] or "0") >= began then
      return 0
    end
  end
  for i = #KEYS - n + 1, #KEYS do
    local pttl_tag = redis.call("PTTL", KEYS[i])
    local high = tonumber(redis.call("HGET", KEYS[i], "w") or "0")
    if t_version > high then
      redis.call("HSET", KEYS[i], "w", string.format("%.0f", t_version))
    end
    redis.call("HSETNX", KEYS[i], "i", "0")
    if ttl == 0 then
      if pttl_tag >= 0 then
        redis.call("PERSIST", KEYS[i])
      end
    elseif pttl_tag == -2 or (pttl_tag >= 0 and pttl_tag < ttl) then
      redis.call("PEXPIRE", KEYS[i], ttl)
    end
  end
end


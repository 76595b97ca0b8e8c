-- A write-behind write: the write script (write.lua, inserted where the marker line below
-- stands, unchanged) and, once it applied, the write appended to the namespace's write-behind
-- stream: one atomic step, so a write the caller saw acknowledged is always queued for the origin.
--
-- KEYS: those of write.lua, then the write-behind stream (popped here, so write.lua sees its own)
-- ARGV: those of write.lua (ARGV[1] op, ARGV[2] version, ARGV[3] envelope, ARGV[8] encoded key)
--
-- The stream entry: o op ("S" set, "D" delete), k encoded key, v version, e envelope. It is never
-- trimmed: entries leave only once flushed (wb_done.lua). Returns write.lua's reply.

local wb_stream = table.remove(KEYS)

local function tc_write()
--@WRITE@
end

local reply = tc_write()
if tonumber(reply[1]) == 1 and tonumber(reply[3]) ~= -1 then
  redis.call("XADD", wb_stream, "*", "o", ARGV[1], "k", ARGV[8], "v", reply[2], "e", ARGV[3])
end
return reply

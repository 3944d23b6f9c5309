-- expect: 500 memory_limit_exceeded
-- config: {"memory": "16MiB"}
-- json.decode runs host-side; what it builds still counts against the cap.
-- Each decode builds 20 000 tables: many decodes fill the cap, and no single one comes near
-- the I/O thread's 100 ms blocking cap, which counts wall time — with 60 000 a decode on a
-- busy 2-core machine passed it and the call ended `function_blocked` instead.
local json = require("json")
return function(event)
  if event.queryStringParameters then return "ok" end
  local text = "[" .. string.rep("{},", 20000) .. "{}]"
  local hoard = {}
  while true do hoard[#hoard + 1] = json.decode(text) end
end

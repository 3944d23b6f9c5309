-- expect: 500 memory_limit_exceeded
-- config: {"memory": "16MiB"}
-- json.decode runs host-side; what it builds still counts against the cap.
local json = require("json")
return function(event)
  if event.queryStringParameters then return "ok" end
  local text = "[" .. string.rep("{},", 60000) .. "{}]"
  local hoard = {}
  while true do hoard[#hoard + 1] = json.decode(text) end
end

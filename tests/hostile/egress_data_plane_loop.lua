-- expect: 500 function_error
-- denied: data_plane
-- A function calling itself through the node's data plane, in a loop: denied unless its
-- own egress_allow names the data plane's address and port.
local http = require("http")
return function(event)
  if event.queryStringParameters then return "ok" end
  local r, err = http.post("http://{{DATA}}/fn/egress-data-plane-loop", "again")
  if r then return { reached = "data plane", status = r.status } end
  if not string.find(err, "denied by policy: data_plane", 1, true) then
    return { not_denied = "data plane", err = err }
  end
  error(err)
end

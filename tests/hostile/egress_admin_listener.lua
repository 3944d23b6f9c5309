-- expect: 500 function_error
-- denied: admin_listener
-- The node's own admin API (metrics, OpenAPI, probes) by its address: always denied,
-- before any connection.
local http = require("http")
return function(event)
  if event.queryStringParameters then return "ok" end
  for _, path in ipairs({ "/metrics", "/v1/openapi.json", "/healthz" }) do
    local r, err = http.get("http://{{ADMIN}}" .. path)
    if r then return { reached = path, status = r.status } end
    if not string.find(err, "denied by policy: admin_listener", 1, true) then
      return { not_denied = path, err = err }
    end
  end
  error("every call to the admin API was denied")
end

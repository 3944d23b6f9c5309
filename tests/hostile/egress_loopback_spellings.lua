-- expect: 500 function_error
-- denied: admin_listener
-- The admin API's port on loopback in every spelling the URL parser accepts (decimal,
-- hex, octal, short forms, IPv4-mapped/compatible, NAT64, 6to4, unspecified, a name):
-- each one is denied by the policy (not merely unreachable).
local http = require("http")
local port = "{{ADMIN_PORT}}"
local hosts = {
  "127.0.0.1", "localhost", "LocalHost", "127.1", "127.0.1", "2130706433", "0x7f000001",
  "0x7f.1", "0177.0.0.1", "017700000001", "127.0.0.1.", "%31%32%37.0.0.1",
  "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::127.0.0.1]", "[64:ff9b::127.0.0.1]",
  "[2002:7f00:1::]", "[::1]", "0.0.0.0", "0", "[::]",
}
return function(event)
  if event.queryStringParameters then return "ok" end
  for _, host in ipairs(hosts) do
    local r, err = http.request({ url = "http://" .. host .. ":" .. port .. "/metrics" })
    if r then return { reached = host, status = r.status } end
    if not string.find(err, "denied by policy", 1, true) then
      return { not_denied = host, err = err }
    end
  end
  error("every spelling was denied")
end

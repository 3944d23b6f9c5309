-- expect: 500 function_error
-- denied: private
-- Private, shared, link-local, multicast and broadcast addresses (backends behind the
-- gateway, other tenants' services): refused before any packet is sent.
local http = require("http")
local hosts = {
  "10.0.0.1", "172.16.0.1", "192.168.0.1", "0xc0a80001", "100.64.0.1", "169.254.1.1",
  "224.0.0.1", "255.255.255.255", "[fd00::1]", "[fe80::1]", "[::ffff:10.0.0.1]",
}
return function(event)
  if event.queryStringParameters then return "ok" end
  for _, host in ipairs(hosts) do
    local r, err = http.get("http://" .. host .. ":8080/", { timeout_ms = 500 })
    if r then return { reached = host, status = r.status } end
    if not string.find(err, "denied by policy", 1, true) then
      return { not_denied = host, err = err }
    end
  end
  error("every private address was denied")
end

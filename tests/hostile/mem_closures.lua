-- expect: 500 memory_limit_exceeded
-- config: {"memory": "16MiB"}
return function(event)
  if event.queryStringParameters then return "ok" end
  local keep = {}
  local i = 0
  while true do
    i = i + 1
    local captured = i
    keep[i] = function() return captured end
  end
end

-- expect: 500 memory_limit_exceeded
-- config: {"memory": "16MiB"}
-- Catching the memory error must not let the function escape the cap.
return function(event)
  if event.queryStringParameters then return "ok" end
  local hoard = {}
  while true do
    pcall(function()
      local s = "z"
      while true do s = s .. s; hoard[#hoard + 1] = s end
    end)
  end
end

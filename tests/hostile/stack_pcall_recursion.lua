-- expect: 500 function_error
return function(event)
  if event.queryStringParameters then return "ok" end
  local function down() local ok, err = pcall(down) if not ok then error(err, 0) end end
  down()
end

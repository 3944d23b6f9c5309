-- expect: 500 function_error output_header_count
-- 60 000 spellings of Transfer-Encoding: each is dropped (framing is the node's), but the
-- node looks at no more than 4 x 100 entries before it refuses the result.
return function(event)
  if event.queryStringParameters then return "ok" end
  local name = "transfer-encoding"
  local headers = {}
  for i = 0, 59999 do
    local out = {}
    for c = 1, #name do
      local ch = name:sub(c, c)
      if bit32.extract(i, (c - 1) % 16) == 1 then ch = ch:upper() end
      out[c] = ch
    end
    headers[table.concat(out)] = "chunked"
  end
  return { statusCode = 200, headers = headers, body = "x" }
end

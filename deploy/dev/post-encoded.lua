-- wrk script: POST the file $BENCH_BODY as it is (already compressed) with $KEY and
-- `Content-Encoding: $ENCODING`, and print how many answers had each status.
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

local body
function init(args)
  local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
  body = f:read("*a")
  f:close()
  s201, s413, s503, other = 0, 0, 0, 0
end

function request()
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["Content-Encoding"] = os.getenv("ENCODING") or "identity",
    ["x-api-key"] = os.getenv("KEY") or "",
  }, body)
end

function response(status, headers, b)
  if status == 201 then s201 = s201 + 1
  elseif status == 413 then s413 = s413 + 1
  elseif status == 503 then s503 = s503 + 1
  else other = other + 1 end
end

function done(summary, latency, requests)
  local t = {0, 0, 0, 0}
  for _, thread in ipairs(threads) do
    t[1] = t[1] + thread:get("s201")
    t[2] = t[2] + thread:get("s413")
    t[3] = t[3] + thread:get("s503")
    t[4] = t[4] + thread:get("other")
  end
  io.write(string.format("answers 201=%d 413=%d 503=%d other=%d\n", t[1], t[2], t[3], t[4]))
end

-- wrk script: POST valid, varied tunnel-telemetry reports to /report.
--
--   wrk -t2 -c64 -d20s --latency -s bench/report.lua http://127.0.0.1:PORT/report \
--       -- ADDRESSES_FILE NONCE [CLIENTS_FILE]
--
-- ADDRESSES_FILE: one IP address per line (IPv4 or IPv6), used for endpoints.
-- NONCE: a number that makes this run's report uuids distinct from any other run's.
-- CLIENTS_FILE: addresses sent as X-Forwarded-For client address (the server runs with
-- --proxy-hops 1); default ADDRESSES_FILE.
-- Every report gets a unique uuid (nonce, thread, counter), a time between now and six
-- days ago, a varied endpoint (protocol, address or host name, port), config and failure.
-- done() prints one line "BENCH_JSON {...}" with the counts and latency percentiles.

local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

local addresses = {}
local clients = {}
local counter = 0
local nonce = 0
local protos = {"ss", "vless", "vmess", "trojan", "wireguard", "hysteria2", "obfs4", "https"}
local transports = {"tcp", "ws", "grpc", "quic", "h2"}
local ciphers = {"chacha20-ietf-poly1305", "aes-256-gcm", "aes-128-gcm", "none"}
local failures = {
  '{"op":"connect","msg":"connection reset by peer","posix_error":"ECONNRESET"}',
  '{"op":"tls-handshake","msg":"remote error: tls: handshake failure"}',
  '{"op":"connect","error":"i/o timeout","posix_error":"ETIMEDOUT"}',
  '{"op":"read","msg":"unexpected EOF"}',
}

function init(args)
  local path = args[1] or "addresses.txt"
  nonce = tonumber(args[2] or "0") % 4294967296
  for line in io.lines(path) do
    if line ~= "" then table.insert(addresses, line) end
  end
  if #addresses == 0 then error("no addresses in " .. path) end
  for line in io.lines(args[3] or path) do
    if line ~= "" then table.insert(clients, line) end
  end
  if #clients == 0 then error("no client addresses") end
  math.randomseed(nonce + 7919 * (id + 1))
  statuses = {}
end

local function pick(list)
  return list[math.random(#list)]
end

local function endpoint()
  local proto = pick(protos)
  local port = math.random(1, 65535)
  if math.random() < 0.1 then
    return string.format("%s://proxy%d.example.net:%d", proto, math.random(1, 500), port)
  end
  local addr = pick(addresses)
  if string.find(addr, ":", 1, true) then addr = "[" .. addr .. "]" end
  return string.format("%s://%s:%d", proto, addr, port)
end

local function report_time()
  local age
  if math.random() < 0.5 then age = math.random(0, 3600) else age = math.random(0, 6 * 86400) end
  return os.date("!%Y-%m-%dT%H:%M:%SZ", os.time() - age)
end

function request()
  counter = counter + 1
  local uuid = string.format("%08x-%04x-4%03x-8%03x-%012x", nonce, id % 65536,
                             math.random(0, 4095), math.random(0, 4095), counter)
  local failure = "null"
  if math.random() < 0.3 then failure = pick(failures) end
  local body = string.format(
    '{"report-type":"tunnel-telemetry","uuid":"%s","time":"%s","endpoint":"%s",' ..
    '"config":{"prefix":"p%d","transport":"%s","cipher":"%s"},"duration_ms":%d,' ..
    '"failure":%s,"sampling_rate":1}',
    uuid, report_time(), endpoint(), math.random(0, 99), pick(transports), pick(ciphers),
    math.random(0, 30000), failure)
  local headers = {
    ["Content-Type"] = "application/json",
    ["X-Forwarded-For"] = pick(clients),
  }
  return wrk.format("POST", nil, headers, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    local counts = thread:get("statuses") or {}
    for status, n in pairs(counts) do
      total[status] = (total[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(total) do
    table.insert(parts, string.format('"%d":%d', status, n))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"mean":%.1f},' ..
    '"statuses":{%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean, table.concat(parts, ",")))
end

-- The harness the Neovim scripts share (loaded with dofile): a coroutine that sleeps on timers so
-- Neovim's main loop runs between steps, waits with timeouts, typed keys, the ghost text shown, the
-- plugin set up against the real server, and what the script saw written as JSON for tests/nvim.rs.
--
-- Keys are fed with nvim_feedkeys without the 'x' flag, so they go through Neovim's main loop as
-- typed keys do (insert mode, autocmds, mappings, didChange).

local api = vim.api
local H = {}

function H.env(name)
  local v = os.getenv(name)
  return v or error(name .. ' is not set')
end

local out_path = H.env('STAR_NVIM_OUT')
H.fallback = os.getenv('STAR_NVIM_GHOST') == 'fallback'
H.seen = { ghost = H.fallback and 'fallback' or 'native', notified = {} }
--- Every vim.notify (the user commands report through it), in order.
H.notes = {}

function H.log(...)
  io.stderr:write('[nvim test] ', string.format(...), '\n')
end

function H.save()
  local f = assert(io.open(out_path, 'w'))
  f:write(vim.json.encode(H.seen))
  f:close()
end

local co

function H.fail(msg)
  H.seen.error = tostring(msg)
  H.log('FAIL: %s', msg)
  pcall(H.save)
  vim.cmd('cquit 1')
  if co and coroutine.running() == co then
    coroutine.yield() -- never resumed: :cquit is under way
  end
end
local function resume()
  local ok, err = coroutine.resume(co)
  if not ok then
    H.fail(debug.traceback(co, err))
  end
end

function H.sleep(ms)
  vim.defer_fn(resume, ms)
  coroutine.yield()
end

function H.now_ms()
  return vim.uv.hrtime() / 1e6
end

--- Polls `cond` until it returns a truthy value, which it returns; fails after `timeout_ms`.
function H.wait_for(what, timeout_ms, cond)
  local deadline = H.now_ms() + timeout_ms
  while true do
    local v = cond()
    if v then
      return v
    end
    if H.now_ms() > deadline then
      H.fail(('timed out after %d ms waiting for %s'):format(timeout_ms, what))
    end
    H.sleep(50)
  end
end

--- Feeds keys through the main loop as typed; `remap` lets mappings (the plugin's keys) apply.
function H.feed(keys, remap)
  api.nvim_feedkeys(api.nvim_replace_termcodes(keys, true, false, true), remap and 'mt' or 'nt', false)
end

--- The ghost text shown (the extmark of vim.lsp.inline_completion or of the plugin's fallback):
--- text, row, col; or nil.
function H.ghost()
  local ns = api.nvim_get_namespaces()[H.fallback and 'star_ls.ghost' or 'nvim.lsp.inline_completion']
  if not ns then
    return nil
  end
  for _, m in ipairs(api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true })) do
    local d = m[4]
    if d.virt_text then
      local lines = {}
      for _, l in ipairs({ d.virt_text, unpack(d.virt_lines or {}) }) do
        local parts = {}
        for _, chunk in ipairs(l) do
          parts[#parts + 1] = chunk[1]
        end
        lines[#lines + 1] = table.concat(parts)
      end
      return table.concat(lines, '\n'), m[2], m[3]
    end
  end
end

function H.line(n)
  return api.nvim_buf_get_lines(0, n - 1, n, true)[1]
end

function H.mode()
  return api.nvim_get_mode().mode
end

--- Waits for ghost text on line `n` (1-based), other than `not_this`, and returns it.
function H.ghost_on(n, not_this)
  local t0 = H.now_ms()
  local text = H.wait_for(('ghost text on line %d'):format(n), 60000, function()
    local text, row = H.ghost()
    return row == n - 1 and text ~= '' and text ~= not_this and text
  end)
  H.log('line %d: ghost text %q after %.0f ms', n, text, H.now_ms() - t0)
  return text
end

--- Runs an Ex command that reports with vim.notify, and returns what it reported.
function H.reported(cmd)
  local n = #H.notes
  vim.cmd(cmd)
  return H.wait_for(cmd .. ' to report', 5000, function()
    return H.notes[n + 1]
  end)
end

--- The plugin from STAR_NVIM_PLUGIN set up with `opts` against the server STAR_NVIM_SERVER (the
--- plugin/ file sourced as Neovim does at startup), notifications and star/* messages recorded.
function H.setup(opts)
  local plugin = H.env('STAR_NVIM_PLUGIN')
  vim.opt.rtp:prepend(plugin)
  vim.cmd.runtime('plugin/star_ls.lua')
  if H.fallback then
    -- As on Neovim 0.10/0.11, which have no vim.lsp.inline_completion.
    vim.lsp.inline_completion = false
  end
  vim.notify = function(msg)
    H.notes[#H.notes + 1] = msg
  end
  -- Every LSP message goes to lsp.log (in the test's XDG_STATE_HOME), for the evidence on failure.
  vim.lsp.log.set_level('debug')
  api.nvim_create_autocmd('LspNotify', {
    callback = function(args)
      local m = args.data.method
      if m:match('^star/') then
        H.seen.notified[#H.seen.notified + 1] = { method = m, completion_id = args.data.params.completionId }
        H.log('sent %s %s', m, vim.json.encode(args.data.params))
      end
    end,
  })
  local star = require('star_ls')
  star.setup(vim.tbl_extend('force', { cmd = { H.env('STAR_NVIM_SERVER'), 'serve' }, filetypes = { 'python' } }, opts))
  return star
end

--- Opens `path` and waits for the server to attach and its model to load (`:StarLs status`).
function H.open_and_wait(path)
  vim.cmd.edit(vim.fn.fnameescape(path))
  if vim.bo.filetype ~= 'python' then
    return H.fail('filetype is ' .. vim.bo.filetype)
  end
  local client = H.wait_for('star-ls to attach and initialize', 30000, function()
    local c = vim.lsp.get_clients({ name = 'star-ls', bufnr = 0 })[1]
    return c and c.initialized and c
  end)
  H.log('star-ls attached (client %d)', client.id)
  local status = H.wait_for('the model to load (:StarLs status)', 120000, function()
    local msg = H.reported('StarLs status')
    return msg:match('^star%-ls: model ready: ') and msg or H.sleep(200)
  end)
  H.seen.status = status
  H.log('status: %s', status)
  return client
end

--- Runs `body` as the script, with a watchdog for anything its waits do not cover; on success the
--- JSON is written, the files saved and Neovim quits.
function H.run(body)
  vim.defer_fn(function()
    H.fail('the script did not finish in 240 s')
  end, 240000)
  co = coroutine.create(function()
    body()
    H.seen.ok = true
    H.save()
    H.log('done; writing and quitting')
    vim.cmd('wall')
    vim.cmd('qall')
  end)
  vim.schedule(resume)
end

return H

--- Ghost text for Neovim 0.10/0.11, which lack `vim.lsp.inline_completion`: after a pause in insert
--- mode, request `textDocument/inlineCompletion` and show the first item as virtual text at the
--- cursor. `get()` keeps the contract of `vim.lsp.inline_completion.get()`, items the same shape.
local M = {}

local api = vim.api
local ns = api.nvim_create_namespace('star_ls.ghost')
local DEBOUNCE_MS = 200
local has_011 = vim.fn.has('nvim-0.11') == 1

--- Per buffer: { timer, request = {client, id}?, item? }
local state = {}

--- Calls a client method: `client:m(...)` since 0.11, `client.m(...)` before (init.lua uses it too).
local function call(client, method, ...)
  if has_011 then
    return client[method](client, ...)
  end
  return client[method](...)
end
M.call = call

local function text_of(item)
  return type(item.insert_text) == 'table' and item.insert_text.value or item.insert_text
end

local function clear(bufnr)
  local s = state[bufnr]
  if s then
    s.item = nil
    if s.request then
      call(s.request.client, 'cancel_request', s.request.id)
      s.request = nil
    end
  end
  api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
end

--- Shows the item from the cursor on, skipping what was typed since its range started.
local function show(bufnr, item)
  local text = text_of(item)
  local row, col = unpack(api.nvim_win_get_cursor(0))
  local start = item.range.start
  if start.row == row - 1 and start.col < col then
    local typed = api.nvim_get_current_line():sub(start.col + 1, col)
    if text:sub(1, #typed) ~= typed then
      return
    end
    text = text:sub(#typed + 1)
  end
  local lines = vim.split(text, '\n', { plain = true })
  local virt_lines = {}
  for i = 2, #lines do
    virt_lines[#virt_lines + 1] = { { lines[i], 'StarLsSuggestion' } }
  end
  api.nvim_buf_set_extmark(bufnr, ns, row - 1, col, {
    virt_text = { { lines[1], 'StarLsSuggestion' } },
    virt_text_pos = 'inline',
    virt_lines = virt_lines,
    hl_mode = 'combine',
  })
end

local function request(bufnr, client)
  local s = state[bufnr]
  local tick = api.nvim_buf_get_changedtick(bufnr)
  local cursor = api.nvim_win_get_cursor(0)
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  params.context = { triggerKind = 2 } -- Automatic
  local _, id = call(client, 'request', 'textDocument/inlineCompletion', params, function(err, result)
    s.request = nil
    local first = not err and result and (result.items or result)[1]
    require('star_ls').note(first)
    -- Drop answers the developer has moved past.
    if
      not first
      or api.nvim_get_current_buf() ~= bufnr
      or api.nvim_buf_get_changedtick(bufnr) ~= tick
      or not vim.deep_equal(api.nvim_win_get_cursor(0), cursor)
      or not api.nvim_get_mode().mode:match('^i')
    then
      return
    end
    local function pos(p)
      local col = vim.lsp.util._get_line_byte_from_position(bufnr, p, client.offset_encoding)
      return { row = p.line, col = col }
    end
    local here = { line = cursor[1] - 1, character = params.position.character }
    local range = first.range or { start = here, ['end'] = here }
    s.item = {
      client_id = client.id,
      insert_text = first.insertText,
      range = { start = pos(range.start), end_ = pos(range['end']) },
      command = first.command,
    }
    show(bufnr, s.item)
  end, bufnr)
  s.request = id and { client = client, id = id } or nil
end

--- Shows completions in `bufnr` while `enabled(bufnr)` says so.
function M.attach(bufnr, client, enabled)
  if state[bufnr] then
    return
  end
  local s = { timer = vim.uv.new_timer() }
  state[bufnr] = s
  local group = api.nvim_create_augroup('star_ls.ghost.' .. bufnr, { clear = true })
  api.nvim_create_autocmd({ 'InsertEnter', 'CursorMovedI', 'TextChangedI' }, {
    group = group,
    buffer = bufnr,
    callback = function()
      clear(bufnr)
      s.timer:stop()
      s.timer:start(DEBOUNCE_MS, 0, vim.schedule_wrap(function()
        if api.nvim_get_current_buf() == bufnr and api.nvim_get_mode().mode:match('^i') and enabled(bufnr) then
          request(bufnr, client)
        end
      end))
    end,
  })
  api.nvim_create_autocmd({ 'InsertLeave', 'BufLeave' }, {
    group = group,
    buffer = bufnr,
    callback = function()
      s.timer:stop()
      clear(bufnr)
    end,
  })
  api.nvim_create_autocmd('BufWipeout', {
    group = group,
    buffer = bufnr,
    callback = function()
      s.timer:close()
      state[bufnr] = nil
      api.nvim_del_augroup_by_id(group)
    end,
  })
end

local function accept(bufnr, item)
  local lines = vim.split(text_of(item), '\n', { plain = true })
  local r = item.range
  api.nvim_buf_set_text(bufnr, r.start.row, r.start.col, r.end_.row, r.end_.col, lines)
  local last = (#lines == 1 and r.start.col or 0) + #lines[#lines]
  api.nvim_win_set_cursor(0, { r.start.row + #lines, last })
  -- Like Neovim 0.12: run the item's command after inserting it (star.accepted, handled client-side).
  local client = vim.lsp.get_client_by_id(item.client_id)
  local cmd = item.command
  local fn = client and cmd and (client.commands[cmd.command] or vim.lsp.commands[cmd.command])
  if fn then
    fn(cmd, { bufnr = bufnr, client_id = item.client_id })
  end
end

--- Applies the shown item (or hands it to `opts.on_accept`); false when none is shown.
function M.get(opts)
  opts = opts or {}
  local bufnr = api.nvim_get_current_buf()
  local item = state[bufnr] and state[bufnr].item
  if not item then
    return false
  end
  -- Deferred so that it works from an <expr> mapping, as in Neovim's own get().
  vim.schedule(function()
    clear(bufnr)
    if opts.on_accept then
      opts.on_accept(item)
    else
      accept(bufnr, item)
    end
  end)
  return true
end

return M

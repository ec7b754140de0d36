--- star-ls for Neovim: fill-in-the-middle completions from a local model, shown as ghost text, and
--- the developer's verdict on each one (accept / reject / correct) reported back to the server.
---
--- On Neovim 0.12+ the ghost text is Neovim's own `vim.lsp.inline_completion`; on 0.10/0.11 a small
--- fallback (star_ls.fallback) does the same job. Either way the keys below go through one `get()`
--- with the contract of `vim.lsp.inline_completion.get()`.
local M = {}

local NAME = 'star-ls'

M.defaults = {
  cmd = { 'star-ls', 'serve' },
  filetypes = {
    'c', 'cpp', 'cs', 'go', 'java', 'javascript', 'javascriptreact', 'kotlin', 'lua', 'php',
    'python', 'ruby', 'rust', 'scala', 'sh', 'swift', 'typescript', 'typescriptreact', 'zig',
  },
  --- initializationOptions, camelCase as the server reads them (modelPath, maxTokens, multiline, ...).
  settings = {},
  --- Insert-mode keys; `false` leaves a key unmapped. Each falls back to the key itself when no
  --- completion is shown.
  keys = { accept = '<Tab>', accept_word = '<M-Right>', dismiss = '<C-]>' },
  --- On quit, wait this long for star-ls to finish its shutdown (it records pending outcomes then).
  exit_wait_ms = 3000,
}

M.config = vim.deepcopy(M.defaults)

--- The id of the last completion the developer accepted, took a word of, or dismissed (:StarExplain).
M.last_completion_id = nil

local call = require('star_ls.fallback').call

local function client_for(bufnr)
  return vim.lsp.get_clients({ name = NAME, bufnr = bufnr })[1]
    or vim.lsp.get_clients({ name = NAME })[1]
end

local function completion_id(item)
  local cmd = item and item.command
  return cmd and cmd.arguments and cmd.arguments[1]
end

--- `vim.lsp.inline_completion.get` where Neovim has it, else the fallback's.
local function get(opts)
  if vim.lsp.inline_completion then
    return vim.lsp.inline_completion.get(opts)
  end
  return require('star_ls.fallback').get(opts)
end

local function notify(method, id, extra)
  local client = client_for(0)
  if client and id ~= nil then
    call(client, 'notify', method, vim.tbl_extend('force', { completionId = id }, extra or {}))
  end
end

-- Keys -------------------------------------------------------------------------------------------

--- Accepts the shown completion. Neovim inserts it and then runs the item's command, `star.accepted`,
--- which the client handles below by sending `star/didAccept`.
--- Returns false when there is nothing to accept.
function M.accept()
  return get()
end

--- The part of `text` (an item's insertText, replacing from `start`) not yet in the buffer.
local function remaining(bufnr, text, start)
  local row, col = unpack(vim.api.nvim_win_get_cursor(0))
  row = row - 1
  if start and start.row == row and start.col <= col then
    local typed = vim.api.nvim_buf_get_lines(bufnr, row, row + 1, true)[1]:sub(start.col + 1, col)
    if text:sub(1, #typed) == typed then
      return text:sub(#typed + 1), row, col
    end
  end
  return text, row, col
end

--- The first word of `s` with the blanks (newlines included) before it, or one punctuation run.
local function next_word(s)
  return s:match('^%s*[%w_]+') or s:match('^%s*[^%w_%s]+') or s
end

--- Inserts the next word of the shown completion. No notification: the server sees the typed text
--- in didChange and infers the outcome from what the developer keeps.
function M.accept_word()
  local bufnr = vim.api.nvim_get_current_buf()
  return get({
    on_accept = function(item)
      M.last_completion_id = completion_id(item) or M.last_completion_id
      local text = item.insert_text
      text = type(text) == 'table' and text.value or text
      local rest, row, col = remaining(bufnr, text, item.range and item.range.start)
      local lines = vim.split(next_word(rest), '\n', { plain = true })
      vim.api.nvim_buf_set_text(bufnr, row, col, row, col, lines)
      local last = #lines == 1 and col + #lines[1] or #lines[#lines]
      vim.api.nvim_win_set_cursor(0, { row + #lines, last })
    end,
  })
end

--- Hides the shown completion and tells the server it was rejected.
function M.dismiss()
  return get({
    on_accept = function(item)
      local id = completion_id(item)
      M.last_completion_id = id or M.last_completion_id
      notify('star/didReject', id)
    end,
  })
end

local function map_keys(bufnr)
  local actions = { accept = M.accept, accept_word = M.accept_word, dismiss = M.dismiss }
  for name, lhs in pairs(M.config.keys or {}) do
    if lhs and actions[name] then
      vim.keymap.set('i', lhs, function()
        -- get() defers the edit (vim.schedule), so this works as an <expr> mapping.
        return actions[name]() and '' or lhs
      end, { buffer = bufnr, expr = true, desc = 'star-ls: ' .. name:gsub('_', ' ') })
    end
  end
end

-- Commands ---------------------------------------------------------------------------------------

--- Runs a server command (workspace/executeCommand); `on_result(result)` on success, errors shown.
function M.exec(command, arguments, on_result)
  local client = client_for(0)
  if not client then
    vim.notify('star-ls is not running', vim.log.levels.WARN)
    return
  end
  local params = { command = command, arguments = arguments }
  call(client, 'request', 'workspace/executeCommand', params, function(err, result)
    if err then
      local msg = err.message or vim.inspect(err)
      -- The server's messages mostly name the command already.
      if not msg:find(command, 1, true) then
        msg = command .. ': ' .. msg
      end
      vim.notify('star-ls: ' .. msg, vim.log.levels.ERROR)
    elseif on_result then
      on_result(result)
    end
  end, 0)
end

local function to_json(value)
  local ok, s = pcall(vim.json.encode, value, { indent = '  ', sort_keys = true })
  return ok and s or vim.inspect(value)
end

--- Shows `value` in a scratch buffer in a split.
local function show(title, value)
  local text = type(value) == 'string' and value or to_json(value)
  vim.cmd('botright new')
  local buf = vim.api.nvim_get_current_buf()
  vim.bo[buf].buftype = 'nofile'
  vim.bo[buf].bufhidden = 'wipe'
  vim.bo[buf].swapfile = false
  vim.api.nvim_buf_set_lines(buf, 0, -1, false, vim.split(text, '\n', { plain = true }))
  vim.bo[buf].modifiable = false
  if type(value) ~= 'string' then
    vim.bo[buf].filetype = 'json'
  end
  pcall(vim.api.nvim_buf_set_name, buf, 'star-ls://' .. title)
end

--- One line per field of star.status, the model's state first.
function M.format_status(s)
  if type(s) ~= 'table' then
    return 'star-ls: ' .. tostring(s)
  end
  local lines = { 'star-ls: model ' .. tostring(s.model) }
  for _, k in ipairs({ 'failuresPending', 'guardCases', 'patches', 'repairRunning', 'lastRepair' }) do
    if s[k] ~= nil and s[k] ~= vim.NIL then
      lines[#lines + 1] = ('  %s: %s'):format(k, type(s[k]) == 'table' and vim.json.encode(s[k]) or tostring(s[k]))
    end
  end
  return table.concat(lines, '\n')
end

local function create_commands()
  local cmd = vim.api.nvim_create_user_command
  cmd('StarStatus', function()
    M.exec('star.status', nil, function(r)
      vim.notify(M.format_status(r), vim.log.levels.INFO)
    end)
  end, { desc = 'star-ls: model and repair status' })
  cmd('StarRepair', function()
    M.exec('star.repairNow', nil, function(r)
      vim.notify('star-ls: repair: ' .. (type(r) == 'table' and vim.json.encode(r) or tostring(r)))
    end)
  end, { desc = 'star-ls: repair the model from the recorded failures now' })
  cmd('StarPatches', function()
    M.exec('star.listPatches', nil, function(r)
      show('patches', r)
    end)
  end, { desc = 'star-ls: list the model patches' })
  cmd('StarRollback', function(o)
    M.exec('star.rollback', { o.args }, function(r)
      vim.notify('star-ls: rollback ' .. o.args .. ': ' .. (type(r) == 'table' and vim.json.encode(r) or tostring(r)))
    end)
  end, {
    nargs = 1,
    complete = function()
      return { 'all' }
    end,
    desc = 'star-ls: roll back a patch by id, or all',
  })
  cmd('StarExplain', function(o)
    local id = o.args ~= '' and o.args or M.last_completion_id
    if not id then
      vim.notify('star-ls: no completion handled yet; :StarExplain {completionId}', vim.log.levels.WARN)
      return
    end
    M.exec('star.explain', { id }, function(r)
      show('explain', r)
    end)
  end, { nargs = '?', desc = 'star-ls: explain a completion (default: the last one handled)' })
end

-- Setup ------------------------------------------------------------------------------------------

--- Client-side handler for the command each inline item carries. Neovim runs it after inserting the
--- item; handling it here (rather than as workspace/executeCommand) makes it one notification with
--- no round trip, and lets :StarExplain know the id.
local function on_accepted(command, ctx)
  local id = command.arguments and command.arguments[1]
  M.last_completion_id = id or M.last_completion_id
  local client = vim.lsp.get_client_by_id(ctx.client_id)
  if client and id ~= nil then
    call(client, 'notify', 'star/didAccept', { completionId = id })
  end
end

local function on_attach(bufnr, client)
  map_keys(bufnr)
  if vim.lsp.inline_completion then
    -- Deferred: during LspAttach the client is not yet in `attached_buffers`, which enable() reads.
    vim.schedule(function()
      if vim.api.nvim_buf_is_valid(bufnr) then
        vim.lsp.inline_completion.enable(true, { bufnr = bufnr })
      end
    end)
  else
    require('star_ls.fallback').attach(bufnr, client)
  end
end

function M.setup(opts)
  M.config = vim.tbl_deep_extend('force', vim.deepcopy(M.defaults), opts or {})
  local cfg = M.config
  -- Lists replace the defaults rather than merge index by index.
  for _, k in ipairs({ 'cmd', 'filetypes' }) do
    if opts and opts[k] then
      cfg[k] = opts[k]
    end
  end
  local group = vim.api.nvim_create_augroup('star_ls', { clear = true })

  local client_config = {
    name = NAME,
    cmd = cfg.cmd,
    filetypes = cfg.filetypes,
    -- nil when empty: Neovim encodes an empty table as a JSON array, which the server would reject.
    init_options = next(cfg.settings or {}) and cfg.settings or nil,
    commands = { ['star.accepted'] = on_accepted },
    -- No root_dir: completions need no workspace, so one server (one loaded model) serves all buffers.
  }
  if vim.lsp.config and vim.lsp.enable then
    vim.lsp.config(NAME, client_config)
    vim.lsp.enable(NAME)
  else
    vim.api.nvim_create_autocmd('FileType', {
      group = group,
      pattern = cfg.filetypes,
      callback = function(args)
        vim.lsp.start(client_config, { bufnr = args.buf })
      end,
    })
  end

  vim.api.nvim_create_autocmd('LspAttach', {
    group = group,
    callback = function(args)
      local client = vim.lsp.get_client_by_id(args.data.client_id)
      if client and client.name == NAME then
        on_attach(args.buf, client)
      end
    end,
  })

  -- Neovim's own VimLeavePre handler (created when vim.lsp loaded, so it runs before this one) sends
  -- `shutdown` and by default exits without waiting for the answer. star-ls decides the outcome of
  -- any completion still open at shutdown, so give it a moment to do that and exit.
  vim.api.nvim_create_autocmd('VimLeavePre', {
    group = group,
    callback = function()
      local clients = vim.lsp.get_clients({ name = NAME })
      vim.wait(cfg.exit_wait_ms, function()
        for _, c in ipairs(clients) do
          -- Not is_stopped(): that is true as soon as `shutdown` is sent. The process has exited
          -- once its transport is closing.
          if not c.rpc.is_closing() then
            return false
          end
        end
        return true
      end, 20)
    end,
  })

  create_commands()
end

return M

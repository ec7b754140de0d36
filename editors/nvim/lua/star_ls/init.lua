--- star-ls for Neovim: fill-in-the-middle completions from a local model, shown as ghost text, and
--- the developer's verdict on each one (accept / reject / correct) reported back to the server.
---
--- On Neovim 0.12+ the ghost text is Neovim's own `vim.lsp.inline_completion`; on 0.10/0.11 a small
--- fallback (star_ls.fallback) does the same job. Either way the keys below go through one `get()`
--- with the contract of `vim.lsp.inline_completion.get()`. `:StarLs` (star_ls.commands) and the
--- `<Plug>` maps exist without `setup()` (plugin/star_ls.lua).
local M = {}

M.NAME = 'star-ls'

M.defaults = {
  cmd = { 'star-ls', 'serve' },
  filetypes = {
    'c', 'cpp', 'cs', 'go', 'java', 'javascript', 'javascriptreact', 'kotlin', 'lua', 'php',
    'python', 'ruby', 'rust', 'scala', 'sh', 'swift', 'typescript', 'typescriptreact', 'zig',
  },
  --- initializationOptions, camelCase as the server reads them (modelPath, maxTokens, multiline, ...).
  settings = {},
  --- Insert-mode keys; `false` leaves a key unmapped. With no completion shown each does what the
  --- key did before (your own mapping, e.g. nvim-cmp's `<Tab>`, or the key itself).
  keys = { accept = '<Tab>', accept_line = '<M-C-Right>', accept_word = '<M-Right>', dismiss = '<C-]>' },
  --- Files never completed nor recorded (globs; without a `/` a glob matches the file's name). The
  --- server refuses these and its own defaults whatever a client sends.
  exclude = { '.env*', '*.pem', '*.key', 'id_*' },
  --- A buffer's workspace folder is the nearest directory above it holding one of these (else its own
  --- directory): cases are kept by folder, for `:StarLs forget`.
  root_markers = { '.git', '.hg', '.svn', 'pyproject.toml', 'setup.py', 'Cargo.toml', 'go.mod', 'package.json' },
  --- Completions on at start (`:StarLs toggle` flips it; per buffer `:StarLs toggle buffer`).
  enabled = true,
  --- On quit, wait this long for star-ls to finish its shutdown (it records pending outcomes then).
  exit_wait_ms = 3000,
}

M.config = vim.deepcopy(M.defaults)
M.configured = false

--- The id of the last completion the developer accepted, took a part of, or dismissed (`:StarLs explain`).
M.last_completion_id = nil

--- The server's last `star/status` (model, failuresPending, patches, repairRunning, ...), or nil.
M.status = nil

--- The newest completion shown: `{ id, fired }`, `fired` the patches whose entries opened while it
--- was made (empty: the model alone), or nil.
M.provenance = nil

local call = require('star_ls.fallback').call

function M.client_for(bufnr)
  return vim.lsp.get_clients({ name = M.NAME, bufnr = bufnr })[1]
    or vim.lsp.get_clients({ name = M.NAME })[1]
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

-- Where completions run ------------------------------------------------------------------------

--- Each glob compiled once: `excluded` runs at every completion request.
local compiled = {}

--- True when `bufnr`'s file matches one of the exclusion globs.
function M.excluded(bufnr)
  local path = vim.api.nvim_buf_get_name(bufnr or 0)
  if path == '' then
    return false
  end
  local name = vim.fs.basename(path)
  for _, glob in ipairs(M.config.exclude or {}) do
    local whole = glob:find('/', 1, true) ~= nil
    compiled[glob] = compiled[glob] or vim.glob.to_lpeg(glob)
    if compiled[glob]:match(whole and path or name) then
      return true
    end
  end
  return false
end

--- Completions show in `bufnr`: on globally (or for the buffer, which wins), for a listed filetype,
--- and not an excluded file.
function M.is_enabled(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  local own = vim.b[bufnr].star_ls_enabled
  if own == nil then
    own = M.config.enabled
  end
  return own and vim.tbl_contains(M.config.filetypes, vim.bo[bufnr].filetype) and not M.excluded(bufnr)
end

--- Turns completions on (`on` true), off (false) or over (nil); everywhere, or in buffer `bufnr`.
--- Requests stop at once (`gate`); a completion already shown stays until the cursor moves.
function M.set_enabled(on, bufnr)
  if bufnr then
    local now = M.is_enabled(bufnr)
    vim.b[bufnr].star_ls_enabled = on == nil and not now or on
  else
    M.config.enabled = on == nil and not M.config.enabled or on
  end
end

--- Notes where the first item of an inline completion answer came from: its `star.accepted`
--- command's arguments are `{ id, { fired = {...} } }`; the rest of a completion shown before comes
--- back under the same id without them, and keeps what was noted.
function M.note(item)
  local args = item and item.command and item.command.arguments or {}
  local id, extra = args[1], args[2]
  if type(extra) == 'table' and extra.fired then
    M.provenance = { id = id, fired = extra.fired }
  elseif not (M.provenance and M.provenance.id == id) then
    M.provenance = nil
  end
end

--- Neovim 0.12 turns its inline completion on per client (in all the client's buffers) or per
--- buffer (for all the buffer's clients, other plugins' too): star-ls turns it on for its own client
--- and applies its switches to its own requests, which are not sent where `is_enabled` says no.
local function gate(client)
  if client.star_ls_gated then
    return
  end
  client.star_ls_gated = true
  local request = client.request
  client.request = function(self, method, params, handler, ...)
    if method ~= 'textDocument/inlineCompletion' then
      return request(self, method, params, handler, ...)
    end
    if not M.is_enabled(vim.uri_to_bufnr(params.textDocument.uri)) then
      return false
    end
    return request(self, method, params, function(err, result, ...)
      M.note(not err and result and (result.items or result)[1])
      return handler(err, result, ...)
    end, ...)
  end
end

--- The workspace folder of `bufnr`: the nearest directory with a root marker, else its directory.
function M.root_of(bufnr)
  local path = vim.api.nvim_buf_get_name(bufnr)
  return vim.fs.root(bufnr, M.config.root_markers) or (path ~= '' and vim.fs.dirname(path)) or vim.fn.getcwd()
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

--- The rest of the current line of `s` (with the line break and indentation before it, when `s`
--- starts a new line).
local function next_line(s)
  return s:match('^\n[^\n]*') or s:match('^[^\n]*')
end

--- Inserts the part `take(rest)` of the shown completion. No notification: the server sees the
--- typed text in didChange, answers the next request with the rest without running the model, and
--- infers the outcome from what the developer keeps.
local function accept_part(take)
  local bufnr = vim.api.nvim_get_current_buf()
  return get({
    on_accept = function(item)
      M.last_completion_id = completion_id(item) or M.last_completion_id
      local text = item.insert_text
      text = type(text) == 'table' and text.value or text
      local rest, row, col = remaining(bufnr, text, item.range and item.range.start)
      local lines = vim.split(take(rest), '\n', { plain = true })
      vim.api.nvim_buf_set_text(bufnr, row, col, row, col, lines)
      local last = #lines == 1 and col + #lines[1] or #lines[#lines]
      vim.api.nvim_win_set_cursor(0, { row + #lines, last })
    end,
  })
end

--- Inserts the next word of the shown completion; the rest stays shown.
function M.accept_word()
  return accept_part(next_word)
end

--- Inserts the shown completion up to the end of its line; the rest stays shown.
function M.accept_line()
  return accept_part(next_line)
end

--- Hides the shown completion and tells the server it was rejected.
function M.dismiss()
  return get({
    on_accept = function(item)
      local id = completion_id(item)
      M.last_completion_id = id or M.last_completion_id
      local client = M.client_for(0)
      if client and id ~= nil then
        call(client, 'notify', 'star/didReject', { completionId = id })
      end
    end,
  })
end

M.actions = { accept = M.accept, accept_line = M.accept_line, accept_word = M.accept_word, dismiss = M.dismiss }

--- The insert-mode mapping of `lhs` in `bufnr` (`maparg`'s dictionary; empty when none).
local function mapping(bufnr, lhs)
  return vim.api.nvim_buf_call(bufnr, function()
    return vim.fn.maparg(lhs, 'i', false, true)
  end)
end

--- What `lhs` did in `bufnr` before star-ls mapped it, as an <expr> mapping's function: the user's
--- mapping (run as it was defined), or the key itself.
local function previous(bufnr, lhs)
  local prev = mapping(bufnr, lhs)
  if vim.tbl_isempty(prev) or (prev.desc or ''):match('^star%-ls') then
    return function()
      return vim.keycode(lhs)
    end
  end
  return function()
    local keys
    if prev.callback then
      keys = prev.callback()
      if prev.expr ~= 1 then
        return ''
      end
    else
      keys = prev.expr == 1 and vim.api.nvim_eval(prev.rhs) or prev.rhs
    end
    if type(keys) == 'string' and keys ~= '' then
      if prev.expr ~= 1 or prev.replace_keycodes == 1 then
        keys = vim.keycode(keys)
      end
      vim.api.nvim_feedkeys(keys, prev.noremap == 1 and 'n' or 'm', false)
    end
    return ''
  end
end

--- True when `lhs` is already star-ls's own mapping in `bufnr` (the client attached again).
local function ours(bufnr, lhs)
  local map = mapping(bufnr, lhs)
  return map.buffer == 1 and (map.desc or ''):match('^star%-ls') ~= nil
end

local function map_keys(bufnr)
  for name, lhs in pairs(M.config.keys or {}) do
    local action = M.actions[name]
    if lhs and action and not ours(bufnr, lhs) then
      local fallback = previous(bufnr, lhs)
      vim.keymap.set('i', lhs, function()
        -- get() defers the edit (vim.schedule), so this works as an <expr> mapping.
        if M.is_enabled(bufnr) and action() then
          return ''
        end
        return fallback()
      end, { buffer = bufnr, expr = true, replace_keycodes = false, desc = 'star-ls: ' .. name:gsub('_', ' ') })
    end
  end
end

-- Status -----------------------------------------------------------------------------------------

--- A short statusline part: `star-ls` and the model's state, pending failures (`!n`), patches
--- (`+n`), `repairing` while a repair runs, `shaped:patch-3` when patches shaped the newest
--- completion; `off` where completions are off; "" with no server.
function M.statusline()
  local s = M.status
  if not s then
    return M.client_for(0) and 'star-ls …' or ''
  end
  local parts = { 'star-ls' }
  local model = tostring(s.model or '')
  if not model:match('^ready') then
    parts[#parts + 1] = model:match('^(%S+)') or 'loading'
  end
  if not M.is_enabled(0) then
    parts[#parts + 1] = 'off'
  end
  if (s.failuresPending or 0) > 0 then
    parts[#parts + 1] = '!' .. s.failuresPending
  end
  if (s.patches or 0) > 0 then
    parts[#parts + 1] = '+' .. s.patches
  end
  if s.repairRunning then
    parts[#parts + 1] = 'repairing'
  end
  local fired = M.provenance and M.provenance.fired or {}
  if #fired > 0 then
    parts[#parts + 1] = 'shaped:' .. table.concat(fired, ',')
  end
  return table.concat(parts, ' ')
end

--- `star/status`, pushed by the server on every change: kept for the statusline, then
--- `User StarLsStatus` for anyone who shows it elsewhere.
local function on_status(_, params)
  M.status = params
  vim.schedule(function()
    vim.cmd.redrawstatus({ bang = true })
    vim.api.nvim_exec_autocmds('User', { pattern = 'StarLsStatus', modeline = false })
  end)
end

-- Setup ------------------------------------------------------------------------------------------

--- Client-side handler for the command each inline item carries. Neovim runs it after inserting the
--- item; handling it here (rather than as workspace/executeCommand) makes it one notification with
--- no round trip, and lets :StarLs explain know the id.
local function on_accepted(command, ctx)
  local id = command.arguments and command.arguments[1]
  M.last_completion_id = id or M.last_completion_id
  local client = vim.lsp.get_client_by_id(ctx.client_id)
  if client and id ~= nil then
    call(client, 'notify', 'star/didAccept', { completionId = id })
  end
end

--- One server serves every project: a buffer in a new folder adds it to the client's workspace
--- folders (workspace/didChangeWorkspaceFolders) rather than start another server and model.
local function add_folder(client, bufnr)
  local root = M.root_of(bufnr)
  local uri = vim.uri_from_fname(root)
  for _, f in ipairs(client.workspace_folders or {}) do
    if f.uri == uri then
      return
    end
  end
  local folder = { uri = uri, name = root }
  client.workspace_folders = client.workspace_folders or {}
  table.insert(client.workspace_folders, folder)
  call(client, 'notify', 'workspace/didChangeWorkspaceFolders', { event = { added = { folder }, removed = {} } })
end

local function on_attach(bufnr, client)
  add_folder(client, bufnr)
  map_keys(bufnr)
  if vim.lsp.inline_completion then
    gate(client)
    -- Deferred: during LspAttach the client is not yet in `attached_buffers`, which enable() reads.
    vim.schedule(function()
      vim.lsp.inline_completion.enable(true, { client_id = client.id })
    end)
  else
    require('star_ls.fallback').attach(bufnr, client, M.is_enabled)
  end
end

function M.setup(opts)
  M.config = vim.tbl_deep_extend('force', vim.deepcopy(M.defaults), opts or {})
  local cfg = M.config
  -- Lists replace the defaults rather than merge index by index.
  for _, k in ipairs({ 'cmd', 'filetypes', 'exclude', 'root_markers' }) do
    if opts and opts[k] then
      cfg[k] = opts[k]
    end
  end
  M.configured = true
  local group = vim.api.nvim_create_augroup('star_ls', { clear = true })

  local settings = vim.tbl_extend('force', { exclude = cfg.exclude }, cfg.settings or {})
  local client_config = {
    name = M.NAME,
    cmd = cfg.cmd,
    filetypes = cfg.filetypes,
    init_options = settings,
    commands = { ['star.accepted'] = on_accepted },
    handlers = { ['star/status'] = on_status },
    -- An excluded file never reaches the server; any other gets its folder (added in on_attach).
    root_dir = function(bufnr, on_dir)
      if not M.excluded(bufnr) then
        on_dir(M.root_of(bufnr))
      end
    end,
    reuse_client = function(client, config)
      return client.name == config.name and not call(client, 'is_stopped')
    end,
  }
  if vim.lsp.config and vim.lsp.enable then
    vim.lsp.config(M.NAME, client_config)
    vim.lsp.enable(M.NAME)
  else
    vim.api.nvim_create_autocmd('FileType', {
      group = group,
      pattern = cfg.filetypes,
      callback = function(args)
        if not M.excluded(args.buf) then
          local config = vim.tbl_extend('force', client_config, { root_dir = M.root_of(args.buf) })
          vim.lsp.start(config, { bufnr = args.buf, reuse_client = client_config.reuse_client })
        end
      end,
    })
  end

  vim.api.nvim_create_autocmd('LspAttach', {
    group = group,
    callback = function(args)
      local client = vim.lsp.get_client_by_id(args.data.client_id)
      if client and client.name == M.NAME then
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
      local clients = vim.lsp.get_clients({ name = M.NAME })
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
end

return M

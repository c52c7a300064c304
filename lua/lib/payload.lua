-- Task format 3: a payload of 65 to 512 bytes is kept in pieces of at most 63 bytes. "p" holds
-- the first piece, the fields "1", "2", ... the rest, in order, after the fields lease reads, and
-- "n" the payload's length in bytes (which gives the number of pieces, and shows a hash whose
-- pieces were changed by hand: it is archived as corrupt rather than leased cut).
-- Why: Redis keeps a hash compact (a listpack) only while every value is at most
-- hash-max-listpack-value bytes (64 by default). One longer value turns the whole task into a
-- hash table: about 720 bytes beyond a 200-byte payload, against about 280 in pieces (make
-- bench). 63: the longest string a listpack entry holds with a one-byte header.
-- The price is Redis CPU: each piece is a field to find and write, then to find and read
-- again. The saving is about 500 bytes a task whatever the size, the price grows with it: past
-- 512 bytes a payload is one field (format 2).
local PIECE_BYTES, LONGEST_IN_PIECES = 63, 512
-- The longest payload kept in one field of a compact hash (Redis's default
-- hash-max-listpack-value); a longer one, up to LONGEST_IN_PIECES, goes in pieces.
local LONGEST_IN_ONE_FIELD = 64
-- The names of the pieces after the first: ceil(512 / 63) - 1 of them, and one more to check
-- that no piece follows the last. A literal: a script's top level runs on every call.
local PIECE_NAMES = {"1", "2", "3", "4", "5", "6", "7", "8", "9"}

-- How to store payload: its format version ("2" or "3"), the value of "p", and for format 3
-- the other fields as a flat list for HSET ("n", length, "1", second piece, ...), else nil.
local function payload_fields(payload)
  local size = #payload
  if size <= LONGEST_IN_ONE_FIELD or size > LONGEST_IN_PIECES then
    return "2", payload, nil
  end
  local rest = {"n", string.format("%d", size)}
  local piece = 0
  for first = PIECE_BYTES + 1, size, PIECE_BYTES do
    piece = piece + 1
    rest[#rest + 1] = PIECE_NAMES[piece]
    rest[#rest + 1] = string.sub(payload, first, first + PIECE_BYTES - 1)
  end
  return "3", string.sub(payload, 1, PIECE_BYTES), rest
end

-- The whole payload of a format-3 task, from its "p" (first piece) and "n" (length) as read;
-- nil when either or a piece is missing, a piece follows the last, or the pieces do not make
-- "n" bytes: the caller archives the task as corrupt rather than hand out a cut payload.
local function joined_payload(task_key, first, length)
  length = tonumber(length)
  if not first or not length or length <= LONGEST_IN_ONE_FIELD or length > LONGEST_IN_PIECES
     or length % 1 ~= 0 then
    return nil
  end
  local count = math.ceil(length / PIECE_BYTES) - 1
  local pieces = redis.call("HMGET", task_key, unpack(PIECE_NAMES, 1, count + 1))
  if pieces[count + 1] then
    return nil
  end
  for i = 1, count do
    if not pieces[i] then
      return nil
    end
  end
  local payload = first .. table.concat(pieces, "", 1, count)
  if #payload ~= length then
    return nil
  end
  return payload
end

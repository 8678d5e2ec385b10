/* mpimp's native point-to-point fast path: one C call per raw-repeat message.
 *
 * Problem: a large message that repeats its channel's last dtype and shape travels as
 * its payload alone (mpimp/channels.py).  What mpimp then adds to the MPI calls is
 * Python: a matched probe, the receive, and the completion polls each cost a few
 * Python frames on caches the transfer has just left cold, about 5 us per message, 6%
 * of a 1 MiB message on shared memory.  These functions do the same MPI calls in one
 * C call each, with the GIL released while they poll.
 *
 * A CPython extension module (built at first use by mpimp/fastpath.py with the mpicc of
 * the MPI library in use) over mpi4py's C API: communicators, requests, messages and
 * statuses are mpi4py objects, MPI errors raise mpi4py's MPI.Exception.  Nothing here
 * waits without bound: every loop runs at most `polls` times, and what has not completed
 * is handed back to Python (as an MPI.Request / MPI.Message) for its deadline loop.
 *
 *   isend(comm, buf, nbytes, dst, tag)                          -> MPI.Request
 *   test(request, polls)                                        -> bool
 *   testall(requests, polls)                                    -> bool
 *   recv_raw(comm, src, tag, buf, nbytes, polls, status)        -> None | True | MPI.Request | MPI.Message
 *   recv_run(comm, src, tag, bufs, nbytes, polls, status)       -> list
 *
 * `buf` is an address (int) or a writable buffer object; `nbytes` < 2**31.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <mpi4py/mpi4py.h>

#define MPIMP_FAST_VERSION "mpimp-fast 6"

static PyObject *mpi_exception; /* mpi4py.MPI.Exception */

static PyObject *raise_mpi(int ierr) {
  PyObject *exc = PyObject_CallFunction(mpi_exception, "i", ierr);
  if (exc != NULL) {
    PyErr_SetObject(mpi_exception, exc);
    Py_DECREF(exc);
  }
  return NULL;
}

/* The memory of `obj`: an address given as an int, or a writable buffer's (released at
   once: the caller keeps the object alive while MPI uses it). */
static int address_of(PyObject *obj, void **addr) {
  if (PyLong_Check(obj)) {
    *addr = PyLong_AsVoidPtr(obj);
    return PyErr_Occurred() ? -1 : 0;
  }
  Py_buffer view;
  if (PyObject_GetBuffer(obj, &view, PyBUF_WRITABLE) < 0) return -1;
  *addr = view.buf;
  PyBuffer_Release(&view);
  return 0;
}

static int as_int(PyObject *obj, int *out) {
  long v = PyLong_AsLong(obj);
  if (v == -1 && PyErr_Occurred()) return -1;
  if (v < INT_MIN || v > INT_MAX) {
    PyErr_Format(PyExc_OverflowError, "%ld does not fit an MPI int", v);
    return -1;
  }
  *out = (int)v;
  return 0;
}

static int check_args(const char *name, Py_ssize_t got, Py_ssize_t want) {
  if (got == want) return 0;
  PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, want, got);
  return -1;
}

/* isend(comm, buf, nbytes, dst, tag) -> MPI.Request: MPI_Isend of nbytes bytes. */
static PyObject *fast_isend(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  MPI_Comm *comm;
  void *addr;
  int nbytes, dst, tag, ierr;
  MPI_Request req;
  if (check_args("isend", nargs, 5) < 0 || (comm = PyMPIComm_Get(args[0])) == NULL ||
      address_of(args[1], &addr) < 0 || as_int(args[2], &nbytes) < 0 || as_int(args[3], &dst) < 0 ||
      as_int(args[4], &tag) < 0)
    return NULL;
  Py_BEGIN_ALLOW_THREADS
  ierr = MPI_Isend(addr, nbytes, MPI_BYTE, dst, tag, *comm, &req);
  Py_END_ALLOW_THREADS
  if (ierr != MPI_SUCCESS) return raise_mpi(ierr);
  return PyMPIRequest_New(req);
}

/* test(request, polls) -> bool: MPI_Test up to max(polls, 1) times, the GIL released. */
static PyObject *fast_test(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  MPI_Request *req;
  int polls, done = 0, ierr = MPI_SUCCESS;
  if (check_args("test", nargs, 2) < 0 || (req = PyMPIRequest_Get(args[0])) == NULL ||
      as_int(args[1], &polls) < 0)
    return NULL;
  Py_BEGIN_ALLOW_THREADS
  int i = 0;
  do {
    ierr = MPI_Test(req, &done, MPI_STATUS_IGNORE);
  } while (ierr == MPI_SUCCESS && !done && ++i < polls);
  Py_END_ALLOW_THREADS
  if (ierr != MPI_SUCCESS) return raise_mpi(ierr);
  return PyBool_FromLong(done);
}

/* testall(requests, polls) -> bool: MPI_Testall over a list of MPI.Request objects, up
   to max(polls, 1) times, the GIL released; the objects get the handles back (completed
   ones become MPI.REQUEST_NULL, as with mpi4py's own Testall). */
static PyObject *fast_testall(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  int polls, done = 0, ierr = MPI_SUCCESS;
  if (check_args("testall", nargs, 2) < 0 || as_int(args[1], &polls) < 0) return NULL;
  PyObject *seq = PySequence_Fast(args[0], "testall: requests must be a sequence of MPI.Request");
  if (seq == NULL) return NULL;
  Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  MPI_Request **slots = PyMem_Malloc(sizeof(MPI_Request *) * (n ? n : 1));
  MPI_Request *reqs = PyMem_Malloc(sizeof(MPI_Request) * (n ? n : 1));
  PyObject *result = NULL;
  if (slots == NULL || reqs == NULL) {
    PyErr_NoMemory();
    goto done;
  }
  for (Py_ssize_t i = 0; i < n; i++) {
    if ((slots[i] = PyMPIRequest_Get(PySequence_Fast_GET_ITEM(seq, i))) == NULL) goto done;
    reqs[i] = *slots[i];
  }
  Py_BEGIN_ALLOW_THREADS
  int i = 0;
  do {
    ierr = MPI_Testall((int)n, reqs, &done, MPI_STATUSES_IGNORE);
  } while (ierr == MPI_SUCCESS && !done && ++i < polls);
  Py_END_ALLOW_THREADS
  for (Py_ssize_t k = 0; k < n; k++) *slots[k] = reqs[k];
  result = ierr == MPI_SUCCESS ? PyBool_FromLong(done) : raise_mpi(ierr);
done:
  PyMem_Free(slots);
  PyMem_Free(reqs);
  Py_DECREF(seq);
  return result;
}

/* The result objects are made before any MPI call that could match or post, and the MPI
   calls write their handles straight into them: once a message is matched or a receive
   posted, nothing can fail to hand it to Python. */

/* recv_raw(comm, src, tag, buf, nbytes, polls, status)
 *
 * Matched probe of (src, tag), up to max(polls, 1) times; `status` (an MPI.Status) gets
 * the envelope.  Returns
 *   None         no message yet;
 *   MPI.Message  a message of another size than nbytes: matched, not received (the
 *                caller reads it from `status` and receives it);
 *   True         a message of nbytes, received into buf (its receive completed within
 *                polls tests);
 *   MPI.Request  a message of nbytes, its receive into buf posted, not complete yet
 *                (always so with polls = 0: the caller tests it).
 * An MPI error raises MPI.Exception; a message matched before it comes back instead of
 * the error when the error is its byte count's.
 */
static PyObject *fast_recv_raw(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  MPI_Comm *comm;
  MPI_Status *status;
  void *addr;
  int src, tag, nbytes, polls, ierr, flag = 0, count = -1, done = 0, posted = 0;
  if (check_args("recv_raw", nargs, 7) < 0 || (comm = PyMPIComm_Get(args[0])) == NULL ||
      as_int(args[1], &src) < 0 || as_int(args[2], &tag) < 0 || address_of(args[3], &addr) < 0 ||
      as_int(args[4], &nbytes) < 0 || as_int(args[5], &polls) < 0 ||
      (status = PyMPIStatus_Get(args[6])) == NULL)
    return NULL;
  PyObject *msgobj = PyMPIMessage_New(MPI_MESSAGE_NULL);
  PyObject *reqobj = msgobj == NULL ? NULL : PyMPIRequest_New(MPI_REQUEST_NULL);
  if (reqobj == NULL) {
    Py_XDECREF(msgobj);
    return NULL;
  }
  MPI_Message *msg = PyMPIMessage_Get(msgobj);
  MPI_Request *req = PyMPIRequest_Get(reqobj);
  Py_BEGIN_ALLOW_THREADS
  int i = 0;
  do {
    ierr = MPI_Improbe(src, tag, *comm, &flag, msg, status);
  } while (ierr == MPI_SUCCESS && !flag && ++i < polls);
  if (ierr == MPI_SUCCESS && flag) {
    ierr = MPI_Get_count(status, MPI_BYTE, &count);
    if (ierr == MPI_SUCCESS && count == nbytes) {
      ierr = MPI_Imrecv(addr, nbytes, MPI_BYTE, msg, req);
      posted = ierr == MPI_SUCCESS;
      for (i = 0; posted && ierr == MPI_SUCCESS && !done && i < polls; i++)
        ierr = MPI_Test(req, &done, MPI_STATUS_IGNORE);
    }
  }
  Py_END_ALLOW_THREADS
  if (!flag) *msg = MPI_MESSAGE_NULL; /* (undefined after a probe that found nothing) */
  PyObject *result;
  if (flag && !posted && count != nbytes) { /* another size (or no count): the caller reads it */
    Py_INCREF(msgobj);
    result = msgobj;
  } else if (ierr != MPI_SUCCESS) {
    result = raise_mpi(ierr);
  } else if (!flag) {
    Py_INCREF(Py_None);
    result = Py_None;
  } else if (done) {
    Py_INCREF(Py_True);
    result = Py_True;
  } else {
    Py_INCREF(reqobj);
    result = reqobj;
  }
  Py_DECREF(msgobj);
  Py_DECREF(reqobj);
  return result;
}

/* recv_run(comm, src, tag, bufs, nbytes, polls, status) -> list
 *
 * Several receives of one (src, tag), in posting order: while a message of (src, tag) is
 * there (up to max(polls, 1) MPI_Improbe each), receive it into the next of `bufs` (a
 * sequence of addresses) when it has nbytes; stops at a probe that finds nothing, or after a
 * message of another size (matched, not received; its envelope in `status`).  Returns a
 * list of len(bufs) MPI.Request and one MPI.Message, made before the first probe: the
 * requests of the receives posted come first, in order, the others are MPI.REQUEST_NULL
 * (false), and the message is the matched one of another size or MPI.MESSAGE_NULL
 * (nothing to allocate after a match, so nothing posted or matched can be lost).  One C
 * call for a window of messages: the copies run back to back, without Python between
 * them.  An MPI error raises MPI.Exception with that list (the receives posted before it
 * are in flight) as its `mpimp_posted` attribute.
 */
static PyObject *fast_recv_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  MPI_Comm *comm;
  MPI_Status *status;
  int src, tag, nbytes, polls, ierr = MPI_SUCCESS, flag = 0, count = -1;
  if (check_args("recv_run", nargs, 7) < 0 || (comm = PyMPIComm_Get(args[0])) == NULL ||
      as_int(args[1], &src) < 0 || as_int(args[2], &tag) < 0 || as_int(args[4], &nbytes) < 0 ||
      as_int(args[5], &polls) < 0 || (status = PyMPIStatus_Get(args[6])) == NULL)
    return NULL;
  PyObject *seq = PySequence_Fast(args[3], "recv_run: bufs must be a sequence of addresses");
  if (seq == NULL) return NULL;
  Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), posted = 0;
  void **addrs = PyMem_Malloc(sizeof(void *) * (n ? n : 1));
  MPI_Request **reqs = PyMem_Malloc(sizeof(MPI_Request *) * (n ? n : 1));
  PyObject *list = PyList_New(n + 1); /* n requests, then the message of another size */
  PyObject *result = NULL;
  if (addrs == NULL || reqs == NULL) {
    PyErr_NoMemory();
    goto done;
  }
  if (list == NULL) goto done;
  for (Py_ssize_t i = 0; i < n; i++) {
    PyObject *r;
    if (address_of(PySequence_Fast_GET_ITEM(seq, i), &addrs[i]) < 0 ||
        (r = PyMPIRequest_New(MPI_REQUEST_NULL)) == NULL)
      goto done;
    PyList_SET_ITEM(list, i, r);
    reqs[i] = PyMPIRequest_Get(r);
  }
  PyObject *msgobj = PyMPIMessage_New(MPI_MESSAGE_NULL);
  if (msgobj == NULL) goto done;
  PyList_SET_ITEM(list, n, msgobj);
  MPI_Message *msg = PyMPIMessage_Get(msgobj);
  Py_BEGIN_ALLOW_THREADS
  while (posted < n) {
    int i = 0;
    do {
      ierr = MPI_Improbe(src, tag, *comm, &flag, msg, status);
    } while (ierr == MPI_SUCCESS && !flag && ++i < polls);
    if (ierr != MPI_SUCCESS || !flag) break;
    count = -1;
    ierr = MPI_Get_count(status, MPI_BYTE, &count);
    if (ierr != MPI_SUCCESS || count != nbytes) break;
    ierr = MPI_Imrecv(addrs[posted], nbytes, MPI_BYTE, msg, reqs[posted]);
    if (ierr != MPI_SUCCESS) break;
    posted++;
    flag = 0;
  }
  Py_END_ALLOW_THREADS
  int other = flag && count != nbytes; /* (a message that could not be counted comes back too) */
  if (!other) *msg = MPI_MESSAGE_NULL; /* (after a probe that found nothing it is undefined) */
  if (ierr != MPI_SUCCESS && !other) {
    PyObject *exc = PyObject_CallFunction(mpi_exception, "i", ierr);
    if (exc != NULL) {
      PyObject_SetAttrString(exc, "mpimp_posted", list);
      PyErr_SetObject(mpi_exception, exc);
      Py_DECREF(exc);
    }
    goto done;
  }
  Py_INCREF(list);
  result = list;
done:
  Py_XDECREF(list);
  PyMem_Free(addrs);
  PyMem_Free(reqs);
  Py_DECREF(seq);
  return result;
}

static PyMethodDef methods[] = {
    {"isend", (PyCFunction)(void (*)(void))fast_isend, METH_FASTCALL,
     "isend(comm, buf, nbytes, dst, tag) -> MPI.Request"},
    {"test", (PyCFunction)(void (*)(void))fast_test, METH_FASTCALL,
     "test(request, polls) -> bool"},
    {"testall", (PyCFunction)(void (*)(void))fast_testall, METH_FASTCALL,
     "testall(requests, polls) -> bool"},
    {"recv_raw", (PyCFunction)(void (*)(void))fast_recv_raw, METH_FASTCALL,
     "recv_raw(comm, src, tag, buf, nbytes, polls, status) -> None | True | MPI.Request | MPI.Message"},
    {"recv_run", (PyCFunction)(void (*)(void))fast_recv_run, METH_FASTCALL,
     "recv_run(comm, src, tag, bufs, nbytes, polls, status) -> list of MPI.Request (and a last MPI.Message)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_mpimp_fast",
                                    "mpimp's native point-to-point fast path", -1, methods};

PyMODINIT_FUNC PyInit__mpimp_fast(void) {
  if (import_mpi4py() < 0) return NULL;
  PyObject *mpi = PyImport_ImportModule("mpi4py.MPI");
  if (mpi == NULL) return NULL;
  mpi_exception = PyObject_GetAttrString(mpi, "Exception");
  Py_DECREF(mpi);
  if (mpi_exception == NULL) return NULL;
  PyObject *m = PyModule_Create(&module);
  if (m == NULL) return NULL;
  /* the MPI library this was compiled and linked against: mpimp/fastpath.py compares it
     with the one mpi4py runs on, and refuses a mismatch */
  char library[MPI_MAX_LIBRARY_VERSION_STRING];
  int length = 0;
  if (MPI_Get_library_version(library, &length) != MPI_SUCCESS) length = 0;
  PyObject *lib = PyUnicode_DecodeLatin1(library, length, "replace");
  if (lib == NULL || PyModule_AddStringConstant(m, "VERSION", MPIMP_FAST_VERSION) < 0 ||
      PyModule_AddObject(m, "LIBRARY", lib) < 0) { /* (AddObject steals lib on success only) */
    Py_XDECREF(lib);
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
